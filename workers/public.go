package workers

import (
	"errors"
)

// Audit rows are read by products (GET /audit, the audit exports): their
// metadata says what happened in stable words (codes, short reasons, ids)
// and never carries an internal path, an address or a raw error chain.
// Those go to the operators, in one log line per failure.

// publicError is the caller-safe text of an error for audit metadata: a
// failed probe's stable words ("probe: timed out"), or the message of the
// domain error in the chain ("start engine failed"), or "internal error".
func publicError(err error) string {
	var pe *ProbeError
	if errors.As(err, &pe) {
		return pe.Error()
	}
	return errMessage(err)
}
