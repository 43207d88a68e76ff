package main

import (
	"errors"
	"fmt"
	"io"

	"github.com/enginefleet/orchestrator/auditlog"
)

// auditCommand runs `orchestrator audit verify DIR`: it checks the export
// hash chain in DIR (every file present, unaltered, in order) and names
// the first file that fails. It needs no database.
func auditCommand(args []string, stdout, stderr io.Writer) error {
	if len(args) != 2 || args[0] != "verify" {
		fmt.Fprintln(stderr, "usage: orchestrator audit verify DIR")
		return errors.New("usage: orchestrator audit verify DIR")
	}
	rep, err := auditlog.Verify(args[1], auditlog.VerifyOptions{})
	if err != nil {
		var ve *auditlog.VerifyError
		if errors.As(err, &ve) {
			return fmt.Errorf("audit chain broken: %s %s (export %d): %s", ve.Kind, ve.File, ve.Seq, ve.Detail)
		}
		return err
	}
	if rep.Exports == 0 {
		fmt.Fprintf(stdout, "no audit exports in %s\n", args[1])
		return nil
	}
	fmt.Fprintf(stdout, "ok: %d exports, %d rows, chain head %s (%s)\n", rep.Exports, rep.Rows, rep.Head, rep.Last.File)
	return nil
}
