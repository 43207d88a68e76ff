package main

import (
	"errors"
	"flag"
	"fmt"
	"io"

	"github.com/enginefleet/orchestrator/auditlog"
)

const auditUsage = "usage: orchestrator audit verify [--head SEQ:SHA256] DIR"

// auditCommand runs `orchestrator audit verify [--head SEQ:SHA256] DIR`: it
// checks the export hash chain in DIR (every file present, unaltered, in
// order) and names the first file that fails. It needs no database; --head
// anchors the chain to an export recorded elsewhere (GET /audit/exports), the
// only way to notice the newest export replaced together with its manifest.
func auditCommand(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] != "verify" {
		fmt.Fprintln(stderr, auditUsage)
		return errors.New(auditUsage)
	}
	fs := flag.NewFlagSet("audit verify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	head := fs.String("head", "", "SEQ:SHA256 of an export known from outside DIR (the newest succeeded one of GET /audit/exports)")
	if err := fs.Parse(args[1:]); err != nil || fs.NArg() != 1 {
		fmt.Fprintln(stderr, auditUsage)
		return errors.New(auditUsage)
	}
	dir := fs.Arg(0)
	var opts auditlog.VerifyOptions
	if *head != "" {
		a, err := auditlog.ParseAnchor(*head)
		if err != nil {
			return err
		}
		opts.Head = &a
	}
	rep, err := auditlog.Verify(dir, opts)
	if err != nil {
		var ve *auditlog.VerifyError
		if errors.As(err, &ve) {
			return fmt.Errorf("audit chain broken: %s %s (export %d): %s", ve.Kind, ve.File, ve.Seq, ve.Detail)
		}
		return err
	}
	if rep.Exports == 0 {
		fmt.Fprintf(stdout, "no audit exports in %s\n", dir)
		return nil
	}
	fmt.Fprintf(stdout, "ok: %d exports, %d rows, chain head %s (%s)\n", rep.Exports, rep.Rows, rep.Head, rep.Last.File)
	return nil
}
