package nvml

import (
	"os"
	"syscall"
)

// charDevice reports the major and minor of path when it is a character
// device (following symlinks).
func charDevice(path string) (major, minor uint32, ok bool) {
	fi, err := os.Stat(path)
	if err != nil || fi.Mode()&os.ModeCharDevice == 0 {
		return 0, 0, false
	}
	st, isUnix := fi.Sys().(*syscall.Stat_t)
	if !isUnix {
		return 0, 0, false
	}
	dev := uint64(st.Rdev)
	// The glibc encoding of dev_t (gnu_dev_major, gnu_dev_minor).
	major = uint32((dev>>8)&0xfff | (dev>>32)&^0xfff)
	minor = uint32(dev&0xff | (dev>>12)&^0xff)
	return major, minor, true
}
