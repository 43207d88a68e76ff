package main

import (
	"io"

	"github.com/enginefleet/orchestrator/api"
)

// writeOpenAPI prints the OpenAPI document generated from the very huma
// API the server uses.
func writeOpenAPI(w io.Writer) error {
	b, err := api.OpenAPIYAML(version)
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}
