// kstatus-check reads one Kubernetes object (JSON or YAML, for example `kubectl get -o json`) on
// stdin and prints what the kstatus library (sigs.k8s.io/cli-utils/pkg/kstatus/status), which Flux
// uses for health checks, computes for it: {"status": "...", "message": "..."}. A List prints one
// result per item, as a JSON array.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

type result struct {
	Kind    string `json:"kind"`
	Name    string `json:"name"`
	Status  string `json:"status"`
	Message string `json:"message"`
}

func compute(u *unstructured.Unstructured) (result, error) {
	res, err := status.Compute(u)
	if err != nil {
		return result{}, fmt.Errorf("%s/%s: %w", u.GetKind(), u.GetName(), err)
	}
	return result{Kind: u.GetKind(), Name: u.GetName(), Status: string(res.Status), Message: res.Message}, nil
}

func run() error {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		return err
	}
	raw, err := yaml.YAMLToJSON(data)
	if err != nil {
		return err
	}
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(raw); err != nil {
		return err
	}
	enc := json.NewEncoder(os.Stdout)
	if u.IsList() {
		list, err := u.ToList()
		if err != nil {
			return err
		}
		out := []result{}
		for i := range list.Items {
			r, err := compute(&list.Items[i])
			if err != nil {
				return err
			}
			out = append(out, r)
		}
		return enc.Encode(out)
	}
	r, err := compute(u)
	if err != nil {
		return err
	}
	return enc.Encode(r)
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus-check:", err)
		os.Exit(1)
	}
}
