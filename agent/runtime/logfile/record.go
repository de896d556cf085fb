package logfile

import (
	"bytes"
	"errors"
	"fmt"
	"time"
)

// Record is one parsed line of a log file.
type Record struct {
	Time    time.Time
	Stream  Stream
	Partial bool
	// Text without the newline; it aliases the parsed line.
	Text []byte
}

// ParseRecord parses one line of a log file, with or without its newline.
func ParseRecord(line []byte) (Record, error) {
	line = bytes.TrimSuffix(line, []byte{'\n'})
	ts, rest, ok := bytes.Cut(line, []byte{' '})
	if !ok {
		return Record{}, errors.New("log record has no stream")
	}
	t, err := time.Parse(time.RFC3339Nano, string(ts))
	if err != nil {
		return Record{}, fmt.Errorf("log record time: %w", err)
	}
	stream, rest, ok := bytes.Cut(rest, []byte{' '})
	if !ok {
		return Record{}, errors.New("log record has no tag")
	}
	r := Record{Time: t, Stream: Stream(stream)}
	if r.Stream != Stdout && r.Stream != Stderr {
		return Record{}, fmt.Errorf("log record stream %q is neither stdout nor stderr", stream)
	}
	tag, text, ok := bytes.Cut(rest, []byte{' '})
	if !ok {
		return Record{}, errors.New("log record has no text separator")
	}
	switch string(tag) {
	case "F":
	case "P":
		r.Partial = true
	default:
		return Record{}, fmt.Errorf("log record tag %q is neither F nor P", tag)
	}
	if bytes.IndexByte(text, '\n') >= 0 {
		return Record{}, errors.New("log record spans lines")
	}
	r.Text = text
	return r, nil
}
