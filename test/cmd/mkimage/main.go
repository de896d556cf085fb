// Command mkimage writes a small OCI image archive built from the host's
// static busybox, for tests and demos that cannot reach a registry:
//
//	mkimage -o busybox.tar -name localhost/gpuaas/busybox:test [-user 65534:65534] [-- cmd args...]
//
// Import the result with `ctr images import busybox.tar` or the agent's
// runtime ImportArchive. It prints the manifest digest.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/gpuaas/gpuaas/test/ociimage"
)

func main() {
	out := flag.String("o", "", "output archive path (required)")
	name := flag.String("name", ociimage.DefaultName, "image reference")
	busybox := flag.String("busybox", "", "static busybox binary (default: found on this host)")
	user := flag.String("user", ociimage.DefaultUser, "config user (uid:gid)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: %s -o out.tar [-name ref] [-user uid:gid] [-busybox path] [-- cmd args...]\n", os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()
	if *out == "" {
		flag.Usage()
		os.Exit(2)
	}
	img, err := ociimage.WriteArchiveFile(*out, ociimage.Options{
		Name:        *name,
		BusyboxPath: *busybox,
		User:        *user,
		Cmd:         flag.Args(),
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "mkimage: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("%s %s\n", img.Name, img.Manifest.Digest)
}
