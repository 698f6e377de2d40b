// nio-kstatus prints what the kstatus library (sigs.k8s.io/cli-utils/pkg/kstatus/status, which Flux's health
// checks and kpt use) computes for Kubernetes objects: it reads a JSON array of objects on stdin and prints one
// line per object, "NAME<TAB>STATUS<TAB>MESSAGE". NIO's tests use it to prove its status conditions are read
// the way GitOps tools read them.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	var objects []json.RawMessage
	if err := json.NewDecoder(os.Stdin).Decode(&objects); err != nil {
		fmt.Fprintf(os.Stderr, "nio-kstatus: reading a JSON array of objects: %v\n", err)
		os.Exit(2)
	}
	for i, raw := range objects {
		// Decoded as the API machinery does (integers stay int64, which kstatus requires).
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(raw); err != nil {
			fmt.Fprintf(os.Stderr, "nio-kstatus: object %d: %v\n", i, err)
			os.Exit(2)
		}
		res, err := status.Compute(u)
		if err != nil {
			fmt.Fprintf(os.Stderr, "nio-kstatus: %s: %v\n", u.GetName(), err)
			os.Exit(1)
		}
		fmt.Printf("%s\t%s\t%s\n", u.GetName(), res.Status, res.Message)
	}
}
