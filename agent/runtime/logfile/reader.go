package logfile

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
)

// scanBlock is how much the reader reads at a time while looking for a line
// boundary.
const scanBlock = 4 << 10

// openRetries bounds how often Open starts over when a rotation ran while
// it was opening the files.
const openRetries = 5

// Reader reads a retained log oldest-first, across its rotated files, as it
// was when the reader was opened: output written later is not included, and
// a rotation during the read changes nothing (the reader holds the files
// open).
type Reader struct {
	files     []*os.File // oldest first
	sizes     []int64
	start     int64 // offset of the selection in the concatenation
	end       int64
	pos       int64
	truncated bool
}

// Open selects what to read of the log at path: everything retained, or
// only the last tailBytes when tailBytes > 0 (starting at a line boundary),
// and at most limitBytes when limitBytes > 0 (ending at a line boundary
// unless one line is longer than the limit). A log that does not exist reads
// as empty. Symbolic links are never followed.
func Open(path string, tailBytes, limitBytes int64) (*Reader, error) {
	if tailBytes < 0 || limitBytes < 0 {
		return nil, fmt.Errorf("tail %d and limit %d must not be negative", tailBytes, limitBytes)
	}
	var files []*os.File
	var gap bool
	for try := 0; ; try++ {
		fs, g, err := openAll(path)
		if err == nil {
			files, gap = fs, g
			break
		}
		if !errors.Is(err, errRotated) || try == openRetries {
			return nil, err
		}
	}
	r := &Reader{files: files, truncated: gap}
	for _, f := range files {
		fi, err := f.Stat()
		if err != nil {
			r.Close()
			return nil, fmt.Errorf("stat log: %w", err)
		}
		r.sizes = append(r.sizes, fi.Size())
		r.end += fi.Size()
	}
	if _, err := os.Lstat(path + DroppedSuffix); err == nil {
		r.truncated = true
	}
	if err := r.selectRange(tailBytes, limitBytes); err != nil {
		r.Close()
		return nil, err
	}
	r.pos = r.start
	return r, nil
}

var errRotated = errors.New("log rotated while opening")

// openAll opens <path>, <path>.1, ... until one is missing and returns them
// oldest first. It reports errRotated when a rotation moved the files while
// they were being opened (one file seen twice, or <path> replaced), which
// only a writer that does not take the directory lock can cause. gap
// reports older files left out behind a missing one.
func openAll(path string) (_ []*os.File, gap bool, _ error) {
	unlock, err := lockDir(filepath.Dir(path), syscall.LOCK_SH)
	if errors.Is(err, os.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	defer unlock()
	var newestFirst []*os.File
	closeAll := func() {
		for _, f := range newestFirst {
			f.Close()
		}
	}
	for i := 0; i <= MaxMaxFiles; i++ {
		f, err := openRead(name(path, i))
		if errors.Is(err, os.ErrNotExist) {
			// Under the lock a gap is not a rotation running: older
			// files behind it were orphaned (a crash between renames) and
			// are left out.
			if _, err := os.Lstat(name(path, i+1)); err == nil {
				gap = true
			}
			break
		}
		if err != nil {
			closeAll()
			return nil, false, err
		}
		newestFirst = append(newestFirst, f)
	}
	if len(newestFirst) > 0 {
		cur, err := os.Lstat(path)
		first, ferr := newestFirst[0].Stat()
		if err != nil || ferr != nil || !os.SameFile(cur, first) {
			closeAll()
			return nil, false, errRotated
		}
		seen := make([]os.FileInfo, 0, len(newestFirst))
		for _, f := range newestFirst {
			fi, err := f.Stat()
			if err != nil {
				closeAll()
				return nil, false, fmt.Errorf("stat log: %w", err)
			}
			for _, s := range seen {
				if os.SameFile(s, fi) {
					closeAll()
					return nil, false, errRotated
				}
			}
			seen = append(seen, fi)
		}
	}
	out := make([]*os.File, len(newestFirst))
	for i, f := range newestFirst {
		out[len(out)-1-i] = f
	}
	return out, gap, nil
}

func openRead(p string) (*os.File, error) {
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC|syscall.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, syscall.ELOOP) {
			return nil, fmt.Errorf("log %s is a symbolic link: refused", p)
		}
		if errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
		return nil, fmt.Errorf("open log: %w", err)
	}
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("log %s is not a regular file", p)
	}
	return f, nil
}

// selectRange narrows [start, end) to the tail and the limit, on line
// boundaries. The end is first moved back to the last newline, so a record
// being written while the log was opened is not returned half.
func (r *Reader) selectRange(tail, limit int64) error {
	if r.end > 0 {
		nl, err := r.lastNewline(0, r.end)
		if err != nil {
			return err
		}
		if nl >= 0 {
			r.end = nl + 1
		}
	}
	if tail > 0 && r.end-r.start > tail {
		r.start = r.end - tail
		r.truncated = true
		prev, err := r.byteAt(r.start - 1)
		if err != nil {
			return err
		}
		if prev != '\n' {
			nl, err := r.nextNewline(r.start, r.end)
			if err != nil {
				return err
			}
			if nl < 0 {
				r.start = r.end
			} else {
				r.start = nl + 1
			}
		}
	}
	if limit > 0 && r.end-r.start > limit {
		r.truncated = true
		cut := r.start + limit
		nl, err := r.lastNewline(r.start, cut)
		if err != nil {
			return err
		}
		if nl >= 0 {
			cut = nl + 1
		}
		r.end = cut
	}
	return nil
}

// readAt reads the concatenation of the files at off.
func (r *Reader) readAt(p []byte, off int64) (int, error) {
	n := 0
	for i, f := range r.files {
		if off >= r.sizes[i] {
			off -= r.sizes[i]
			continue
		}
		want := p[n:]
		if rest := r.sizes[i] - off; int64(len(want)) > rest {
			want = want[:rest]
		}
		m, err := f.ReadAt(want, off)
		n += m
		if err != nil && !errors.Is(err, io.EOF) {
			return n, fmt.Errorf("read log: %w", err)
		}
		if m < len(want) {
			// The file shrank (truncated under us): treat as its end.
			return n, io.ErrUnexpectedEOF
		}
		off = 0
		if n == len(p) {
			return n, nil
		}
	}
	return n, io.EOF
}

func (r *Reader) byteAt(off int64) (byte, error) {
	var b [1]byte
	if _, err := r.readAt(b[:], off); err != nil {
		return 0, err
	}
	return b[0], nil
}

// nextNewline is the offset of the first '\n' in [from, to), or -1.
func (r *Reader) nextNewline(from, to int64) (int64, error) {
	buf := make([]byte, scanBlock)
	for off := from; off < to; {
		n := min(int64(len(buf)), to-off)
		m, err := r.readAt(buf[:n], off)
		if i := bytes.IndexByte(buf[:m], '\n'); i >= 0 {
			return off + int64(i), nil
		}
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return -1, nil
			}
			return -1, err
		}
		off += int64(m)
	}
	return -1, nil
}

// lastNewline is the offset of the last '\n' in [from, to), or -1.
func (r *Reader) lastNewline(from, to int64) (int64, error) {
	buf := make([]byte, scanBlock)
	for hi := to; hi > from; {
		lo := max(from, hi-int64(len(buf)))
		m, err := r.readAt(buf[:hi-lo], lo)
		if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
			return -1, err
		}
		if i := bytes.LastIndexByte(buf[:m], '\n'); i >= 0 {
			return lo + int64(i), nil
		}
		hi = lo
	}
	return -1, nil
}

// Read implements io.Reader over the selection.
func (r *Reader) Read(p []byte) (int, error) {
	if r.pos >= r.end {
		return 0, io.EOF
	}
	if rest := r.end - r.pos; int64(len(p)) > rest {
		p = p[:rest]
	}
	n, err := r.readAt(p, r.pos)
	r.pos += int64(n)
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		// A file shrank after Open: end the read where the data ends.
		r.end = r.pos
		if n > 0 {
			return n, nil
		}
		return 0, io.EOF
	}
	return n, err
}

// Size is how many bytes the selection holds.
func (r *Reader) Size() int64 { return r.end - r.start }

// Truncated reports whether the selection is less than all output ever
// written: older output was rotated away, or the tail or the limit cut it.
func (r *Reader) Truncated() bool { return r.truncated }

// Close closes the files.
func (r *Reader) Close() error {
	var errs []error
	for _, f := range r.files {
		if err := f.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	r.files = nil
	return errors.Join(errs...)
}

// Read returns the selection Open describes, and whether it was cut.
func Read(path string, tailBytes, limitBytes int64) ([]byte, bool, error) {
	r, err := Open(path, tailBytes, limitBytes)
	if err != nil {
		return nil, false, err
	}
	defer r.Close()
	data := make([]byte, 0, r.Size())
	data, err = readAll(r, data)
	if err != nil {
		return nil, false, err
	}
	return data, r.Truncated(), nil
}

func readAll(r io.Reader, b []byte) ([]byte, error) {
	buf := bytes.NewBuffer(b)
	_, err := buf.ReadFrom(r)
	return buf.Bytes(), err
}

// Remove deletes the log at path: every rotated file and the marker.
func Remove(path string) error {
	var errs []error
	for i := 0; i <= MaxMaxFiles; i++ {
		if err := os.Remove(name(path, i)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := os.Remove(path + DroppedSuffix); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
