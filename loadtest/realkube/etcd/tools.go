//go:build tools

// Keeps `go mod tidy` from dropping the requirement on the etcd server main package.
package tools

import _ "go.etcd.io/etcd/server/v3"
