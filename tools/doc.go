// Package tools pins the project's slow-to-build Go tools (buf) in a module
// of their own, so their dependencies never mix with the product's.
package tools
