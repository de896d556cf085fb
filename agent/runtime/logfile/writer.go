// Package logfile stores a container's stdout and stderr in size-capped,
// rotated files and reads them back for `gpuaasctl lease logs`.
//
// Each line of a file is one record in the CRI log format:
//
//	<RFC3339Nano UTC time> <stdout|stderr> <F|P> <text>\n
//
// A line longer than the writer's MaxLine is split into P (partial) records
// ending with an F (full) one, so no record is ever larger than MaxLine plus
// its prefix. The files are <path> (current) and <path>.1 ... <path>.<K-1>
// (older, .1 newest); rotation happens before a record would take the
// current file over MaxBytes, so at most K x MaxBytes is retained. When
// rotation deletes output, an empty <path>.dropped marks the log as cut.
//
// The package never follows a symbolic link: the writer opens with
// O_NOFOLLOW and the reader refuses anything that is not a regular file. It
// must never interpret the tenant's text: records are bytes in, bytes out.
//
// gopkg.in/natefinch/lumberjack.v2 was considered and not used: its size
// cap is whole megabytes (tests and small leases need byte caps), it deletes
// old files asynchronously (the K x MaxBytes bound would not hold at every
// moment), it follows symbolic links, and its backups carry timestamps in
// their names, which the reader would have to sort.
package logfile

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// Limits and defaults.
const (
	// DefaultMaxLine is the longest text of one record; longer lines are
	// split into partial records (the CRI's 16 KiB).
	DefaultMaxLine = 16 << 10
	// MinMaxBytes is the smallest per-file cap a writer accepts.
	MinMaxBytes = 4 << 10
	// MaxMaxFiles is the most files a writer keeps.
	MaxMaxFiles = 100
	// DroppedSuffix names the marker left once rotation deleted output.
	DroppedSuffix = ".dropped"
)

// Stream is the container stream a record came from.
type Stream string

// The two streams.
const (
	Stdout Stream = "stdout"
	Stderr Stream = "stderr"
)

// Permissions of what the writer creates.
const (
	fileMode = 0o600
	dirMode  = 0o750
)

// Options configure a Writer.
type Options struct {
	// MaxBytes caps each file (at least MinMaxBytes).
	MaxBytes int64
	// MaxFiles is how many files are kept, the current one included
	// (1..MaxMaxFiles).
	MaxFiles int
	// MaxLine is the longest text of one record (default DefaultMaxLine,
	// at most MaxBytes/2).
	MaxLine int
	// Now stamps records (default time.Now).
	Now func() time.Time
}

// Writer appends records to a rotated log. It is safe for concurrent use;
// each record is written with one write call, so records of different
// streams interleave only at record boundaries.
type Writer struct {
	path string
	o    Options

	mu   sync.Mutex
	f    *os.File // nil after a failed rotation; reopened on the next write
	size int64
	buf  []byte
}

// NewWriter opens (or creates) the log at path for appending, creating its
// directory (0750) if needed. A symbolic link at path is refused.
func NewWriter(path string, o Options) (*Writer, error) {
	if !filepath.IsAbs(path) || filepath.Clean(path) != path {
		return nil, fmt.Errorf("log path %q must be absolute and clean", path)
	}
	if o.MaxBytes < MinMaxBytes {
		return nil, fmt.Errorf("max bytes %d is below the minimum %d", o.MaxBytes, MinMaxBytes)
	}
	if o.MaxFiles < 1 || o.MaxFiles > MaxMaxFiles {
		return nil, fmt.Errorf("max files %d is not in 1..%d", o.MaxFiles, MaxMaxFiles)
	}
	if o.MaxLine <= 0 {
		o.MaxLine = DefaultMaxLine
	}
	if int64(o.MaxLine) > o.MaxBytes/2 {
		o.MaxLine = int(o.MaxBytes / 2)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if err := os.MkdirAll(filepath.Dir(path), dirMode); err != nil {
		return nil, fmt.Errorf("create log directory: %w", err)
	}
	w := &Writer{path: path, o: o}
	if err := w.open(); err != nil {
		return nil, err
	}
	return w, nil
}

// MaxLine is the longest text of one record.
func (w *Writer) MaxLine() int { return w.o.MaxLine }

// open opens the current file for appending. A file whose last byte is not
// a newline (a record torn by a crash) gets one, so the next record starts
// on its own line.
func (w *Writer) open() error {
	f, err := openAppend(w.path)
	if err != nil {
		return err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("stat log %s: %w", w.path, err)
	}
	size := fi.Size()
	if size > 0 {
		var last [1]byte
		if _, err := f.ReadAt(last[:], size-1); err == nil && last[0] != '\n' {
			n, err := f.Write([]byte{'\n'})
			size += int64(n)
			if err != nil {
				f.Close()
				return fmt.Errorf("repair log %s: %w", w.path, err)
			}
		}
	}
	w.f, w.size = f, size
	return nil
}

func openAppend(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|os.O_APPEND|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, fileMode)
	if err != nil {
		if errors.Is(err, syscall.ELOOP) {
			return nil, fmt.Errorf("log %s is a symbolic link: refused", path)
		}
		return nil, fmt.Errorf("open log: %w", err)
	}
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("log %s is not a regular file", path)
	}
	return f, nil
}

// Write records text (without its newline) from stream. partial marks a
// piece of a longer line; text longer than MaxLine is split into partial
// records. On error nothing of the record is left in the file.
func (w *Writer) Write(stream Stream, text []byte, partial bool) error {
	return w.WriteRecord(Record{Stream: stream, Text: text, Partial: partial})
}

// WriteRecord writes r, stamped with r.Time (now if zero); text longer
// than MaxLine is split as Write does.
func (w *Writer) WriteRecord(r Record) error {
	if r.Stream != Stdout && r.Stream != Stderr {
		return fmt.Errorf("log stream %q is neither stdout nor stderr", r.Stream)
	}
	if bytes.IndexByte(r.Text, '\n') >= 0 {
		return errors.New("log record text holds a newline: split it first (Split)")
	}
	text := r.Text
	for len(text) > w.o.MaxLine {
		if err := w.record(r.Time, r.Stream, text[:w.o.MaxLine], true); err != nil {
			return err
		}
		text = text[w.o.MaxLine:]
	}
	return w.record(r.Time, r.Stream, text, r.Partial)
}

func (w *Writer) record(at time.Time, stream Stream, text []byte, partial bool) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if at.IsZero() {
		at = w.o.Now()
	}
	b := at.UTC().AppendFormat(w.buf[:0], time.RFC3339Nano)
	b = append(b, ' ')
	b = append(b, stream...)
	if partial {
		b = append(b, " P "...)
	} else {
		b = append(b, " F "...)
	}
	b = append(b, text...)
	b = append(b, '\n')
	w.buf = b
	if w.f == nil {
		if err := w.open(); err != nil {
			return err
		}
	}
	if w.size > 0 && w.size+int64(len(b)) > w.o.MaxBytes {
		if err := w.rotate(); err != nil {
			return err
		}
	}
	n, err := w.f.Write(b)
	if err != nil {
		// Leave no torn record behind (O_APPEND: the next write goes to
		// the new end).
		if n > 0 {
			if terr := w.f.Truncate(w.size); terr != nil {
				err = errors.Join(err, terr)
			}
		}
		return fmt.Errorf("write log %s: %w", w.path, err)
	}
	w.size += int64(n)
	return nil
}

// rotate shifts <path>.i to <path>.i+1, dropping the oldest, moves the
// current file to <path>.1 and opens a new one. It holds an exclusive lock
// on the directory meanwhile, so a reader (which takes it shared while it
// opens the files) never sees a rotation half done.
func (w *Writer) rotate() error {
	unlock, err := lockDir(filepath.Dir(w.path), syscall.LOCK_EX)
	if err != nil {
		return err
	}
	defer unlock()
	if err := w.f.Close(); err != nil {
		w.f = nil
		return fmt.Errorf("close log %s: %w", w.path, err)
	}
	w.f = nil
	oldest := w.path
	if w.o.MaxFiles > 1 {
		oldest = w.name(w.o.MaxFiles - 1)
	}
	if err := os.Remove(oldest); err == nil {
		if err := w.markDropped(); err != nil {
			return err
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("rotate log %s: %w", w.path, err)
	}
	for i := w.o.MaxFiles - 2; i >= 0; i-- {
		if err := os.Rename(w.name(i), w.name(i+1)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("rotate log %s: %w", w.path, err)
		}
	}
	return w.open()
}

func (w *Writer) markDropped() error {
	f, err := os.OpenFile(w.path+DroppedSuffix, os.O_CREATE|os.O_WRONLY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, fileMode)
	if err != nil {
		return fmt.Errorf("mark log %s as cut: %w", w.path, err)
	}
	return f.Close()
}

// lockDir takes a flock on dir; rotations of every log in the directory
// and the opening of readers are serialised by it, which costs
// microseconds.
func lockDir(dir string, how int) (func(), error) {
	d, err := os.OpenFile(dir, os.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open log directory: %w", err)
	}
	for {
		err = syscall.Flock(int(d.Fd()), how)
		if !errors.Is(err, syscall.EINTR) {
			break
		}
	}
	if err != nil {
		d.Close()
		return nil, fmt.Errorf("lock log directory: %w", err)
	}
	return func() { d.Close() }, nil
}

// name is the i-th file: the current one for 0, else <path>.i.
func (w *Writer) name(i int) string { return name(w.path, i) }

func name(path string, i int) string {
	if i == 0 {
		return path
	}
	return path + "." + strconv.Itoa(i)
}

// Close closes the current file.
func (w *Writer) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil {
		return nil
	}
	err := w.f.Close()
	w.f = nil
	return err
}

// Split reads r until EOF and calls emit for each line without its newline;
// a line longer than maxLine (at least 16) comes in partial pieces of
// maxLine bytes (partial true) ending with a full one, which may be empty.
// Text at EOF without a newline is a full line. The slice passed to emit is
// valid only during the call. Split returns the read error, nil at EOF.
func Split(r io.Reader, maxLine int, emit func(text []byte, partial bool)) error {
	if maxLine <= 0 {
		maxLine = DefaultMaxLine
	}
	br := bufio.NewReaderSize(r, maxLine)
	for {
		line, err := br.ReadSlice('\n')
		switch {
		case err == nil:
			emit(line[:len(line)-1], false)
		case errors.Is(err, bufio.ErrBufferFull):
			emit(line, true)
		default:
			if len(line) > 0 {
				emit(line, false)
			}
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}
