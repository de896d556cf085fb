//go:build !linux

package nvml

// charDevice never finds a node off Linux, where the driver's nodes do not
// exist; the documented majors and /proc/devices decide.
func charDevice(string) (major, minor uint32, ok bool) { return 0, 0, false }
