//go:build tools

// Keeps `go mod tidy` from dropping the requirement on the kube-apiserver main package.
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
