package api_test

import (
	"os"
	"testing"

	"github.com/pb33f/libopenapi"
	validator "github.com/pb33f/libopenapi-validator"
	"github.com/stretchr/testify/require"
)

// openapi.yaml is valid OpenAPI according to an independent validator
// (pb33f/libopenapi-validator, against the OAS 3.1 schema).
func TestOpenAPIDocumentValid(t *testing.T) {
	raw, err := os.ReadFile("../openapi.yaml")
	require.NoError(t, err)
	doc, err := libopenapi.NewDocument(raw)
	require.NoError(t, err)
	v, errs := validator.NewValidator(doc)
	require.Empty(t, errs)
	ok, verrs := v.ValidateDocument()
	for _, e := range verrs {
		t.Errorf("%s: %s", e.Message, e.Reason)
	}
	require.True(t, ok)
}
