package workers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/atomicfile"
	"github.com/enginefleet/orchestrator/auditlog"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/schema"
)

// Audit exports.
//
// An export writes the audit rows with from <= timestamp < to (of one
// product, or all) in id order as gzip JSONL into ORCH_AUDIT_EXPORT_DIR,
// then its manifest (auditlog.Manifest), both through temporary names,
// fsync and rename, and records it, all under a transaction-scoped lock on
// the chain: seq is the next position and prev_sha256 the previous
// export's sha256, so exports form one hash chain whatever triggered them.
// An export waits until its range ended ORCH settle time ago
// (AuditConfig.ExportSettle), so rows timestamped inside the range by
// transactions still open are committed before it reads.
//
// Scheduled exports (ORCH_AUDIT_EXPORT_CRON) cover the rows since the last
// scheduled export up to the tick: contiguous, none missed, none twice.
// After each, when ORCH_AUDIT_RETENTION_DAYS is set, the purge deletes the
// rows older than the retention that are in a verified export: the whole
// chain is verified from the files on disk (auditlog.Verify), each
// export's hash is checked against the one recorded in Postgres, and only
// the row ids read back from verified files are deleted. A row no
// verified export holds is never purged.

// AuditConfig configures audit exports and the retention purge.
type AuditConfig struct {
	ExportDir    string        // ORCH_AUDIT_EXPORT_DIR ("" = exports refused)
	Retention    time.Duration // ORCH_AUDIT_RETENTION_DAYS (0 = keep forever)
	ExportSettle time.Duration // an export runs this long after its range ends (10 s)
}

func (c AuditConfig) withDefaults() AuditConfig {
	if c.ExportSettle <= 0 {
		c.ExportSettle = 10 * time.Second
	}
	return c
}

// AuditExports writes the audit exports (on demand and scheduled) and
// purges the audit rows past retention that verified exports hold.
type AuditExports struct {
	*runner
	cfg AuditConfig
}

func (ax *AuditExports) register(ws *river.Workers) { river.AddWorker(ws, &auditExportWorker{ax: ax}) }

type auditExportWorker struct {
	river.WorkerDefaults[jobs.AuditExport]
	ax *AuditExports
}

func (x *auditExportWorker) Timeout(*river.Job[jobs.AuditExport]) time.Duration {
	return x.ax.jobTimeout()
}
func (x *auditExportWorker) NextRetry(j *river.Job[jobs.AuditExport]) time.Time {
	return time.Now().Add(time.Duration(j.Attempt*j.Attempt) * 5 * time.Second)
}

func (x *auditExportWorker) Work(ctx context.Context, j *river.Job[jobs.AuditExport]) error {
	ax := x.ax
	start := time.Now()
	q := schema.New(ax.pool)
	var ex schema.AuditExport
	var err error
	if j.Args.ExportID != "" {
		ex, err = q.AuditExportByID(ctx, j.Args.ExportID)
		if orch.IsCode(err, orch.CodeExportNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
	} else {
		tick := j.Args.Tick.UTC()
		if wait := time.Until(tick.Add(ax.cfg.ExportSettle)); wait > 0 {
			return river.JobSnooze(wait)
		}
		var ok bool
		ex, ok, err = ax.scheduledExport(ctx, tick)
		if err != nil || !ok {
			return err
		}
	}
	if ex.Status == orch.OpSucceeded {
		return ax.purgeAfter(ctx, j.Args.ExportID == "")
	}
	if wait := time.Until(ex.To.Add(ax.cfg.ExportSettle)); wait > 0 {
		return river.JobSnooze(wait)
	}
	if err := q.SetExportStatus(ctx, ex.ID, orch.OpRunning, ""); err != nil {
		return err
	}
	done, err := ax.WriteAuditExport(ctx, ex.ID)
	if err != nil {
		last := j.Attempt >= j.MaxAttempts
		ax.log.Warn("job", "job_kind", j.Kind, "export_id", ex.ID, "attempt", j.Attempt, "outcome", "failed", "will_retry", !last, "error", err.Error())
		if last {
			q.SetExportStatus(context.WithoutCancel(ctx), ex.ID, orch.OpFailed, err.Error()) //nolint:errcheck
			return nil
		}
		return err
	}
	ax.log.Info("job", "job_kind", j.Kind, "export_id", ex.ID, "seq", *done.Seq, "rows", *done.RowCount,
		"file", done.File, "duration_ms", time.Since(start).Milliseconds(), "outcome", "succeeded")
	return ax.purgeAfter(ctx, j.Args.ExportID == "")
}

// purgeAfter runs the retention purge after a scheduled export.
func (ax *AuditExports) purgeAfter(ctx context.Context, scheduled bool) error {
	if !scheduled || ax.cfg.Retention <= 0 {
		return nil
	}
	n, err := ax.PurgeAudit(ctx)
	if err != nil {
		// The export itself is done; the next night purges again.
		ax.log.Error("audit purge", "error", err)
		return nil
	}
	if n > 0 {
		ax.log.Info("audit purge", "rows", n)
	}
	return nil
}

// scheduledExport finds or records the export of a scheduled tick: from
// the end of the last scheduled export (the oldest row's day for the
// first) to the tick. ok is false when there is nothing to export.
func (ax *AuditExports) scheduledExport(ctx context.Context, tick time.Time) (schema.AuditExport, bool, error) {
	var ex schema.AuditExport
	ok := false
	err := inTx(ctx, ax.pool, func(tx pgx.Tx) error {
		q := schema.New(tx)
		if err := q.LockExportChain(ctx); err != nil {
			return err
		}
		cur, err := q.AuditExportByTick(ctx, tick)
		if err == nil {
			ex, ok = cur, true
			return nil
		}
		if !orch.IsCode(err, orch.CodeExportNotFound) {
			return err
		}
		from, err := q.LastScheduledEnd(ctx)
		if err != nil {
			return err
		}
		if from == nil {
			if from, err = q.OldestAuditTime(ctx); err != nil {
				return err
			}
			if from == nil || !from.Before(tick) {
				t := tick.Add(-24 * time.Hour)
				from = &t
			}
			t := from.UTC().Truncate(24 * time.Hour)
			from = &t
		}
		if !from.Before(tick) {
			return nil // already covered (a replayed tick)
		}
		ex, err = q.InsertAuditExport(ctx, schema.AuditExport{ID: uuid.NewString(), From: *from, To: tick,
			Trigger: schema.ExportScheduled, Tick: &tick, RequestedBy: orch.ActorSystem})
		ok = err == nil
		return err
	})
	return ex, ok, err
}

// WriteAuditExport writes export id's file and manifest and records it in
// the chain; a finished export is returned as it is. Errors:
// EXPORT_NOT_FOUND.
func (ax *AuditExports) WriteAuditExport(ctx context.Context, id string) (schema.AuditExport, error) {
	var out schema.AuditExport
	if ax.cfg.ExportDir == "" {
		return out, errors.New("ORCH_AUDIT_EXPORT_DIR is not set")
	}
	if err := os.MkdirAll(ax.cfg.ExportDir, 0o700); err != nil {
		return out, fmt.Errorf("create audit export directory: %w", err)
	}
	err := inTx(ctx, ax.pool, func(tx pgx.Tx) error {
		q := schema.New(tx)
		if err := q.LockExportChain(ctx); err != nil {
			return err
		}
		ex, err := q.AuditExportByID(ctx, id)
		if err != nil {
			return err
		}
		if ex.Status == orch.OpSucceeded {
			out = ex
			return nil
		}
		head, err := q.ChainHead(ctx)
		if err != nil {
			return err
		}
		seq, prev := int64(1), ""
		if head != nil {
			seq, prev = *head.Seq+1, head.SHA256
		}
		m, err := ax.writeExportFiles(ctx, q, ex, seq, prev)
		if err != nil {
			return err
		}
		ex.Seq, ex.File, ex.SHA256, ex.PrevSHA256 = &seq, m.File, m.SHA256, prev
		ex.SizeBytes, ex.RowCount = &m.SizeBytes, &m.Rows
		if m.Rows > 0 {
			ex.FirstID, ex.LastID = &m.FirstID, &m.LastID
		}
		if err := q.FinishAuditExport(ctx, ex); err != nil {
			return err
		}
		ex.Status = orch.OpSucceeded
		out = ex
		return nil
	})
	return out, err
}

// writeExportFiles streams the export's rows into its data file and then
// writes its manifest; both appear under their final names only complete.
// A crashed earlier attempt at the same seq is simply replaced (it was
// never recorded, so nothing refers to it).
func (ax *AuditExports) writeExportFiles(ctx context.Context, q *schema.Queries, ex schema.AuditExport, seq int64, prev string) (auditlog.Manifest, error) {
	dir := ax.cfg.ExportDir
	m := auditlog.Manifest{Seq: seq, ExportID: ex.ID, File: auditlog.FileName(seq, ex.From, ex.To),
		From: ex.From.UTC(), To: ex.To.UTC(), ProductID: ex.ProductID, PrevSHA256: prev, CreatedAt: time.Now().UTC()}
	tmp, err := os.CreateTemp(dir, ".tmp-"+m.File+"-*")
	if err != nil {
		return m, fmt.Errorf("create export file: %w", err)
	}
	defer func() { tmp.Close(); os.Remove(tmp.Name()) }() //nolint:errcheck
	ew := auditlog.NewWriter(tmp)
	err = q.ExportAuditRows(ctx, ex.From, ex.To, ex.ProductID, func(r schema.AuditRow) error {
		return ew.Write(auditlog.Row{ID: r.ID, Timestamp: r.Timestamp, ProductID: r.ProductID, UserID: r.UserID,
			EngineID: r.EngineID, Action: r.Action, Actor: r.Actor, Metadata: json.RawMessage(r.Metadata), DurationMS: r.DurationMS})
	})
	if err != nil {
		return m, err
	}
	if err := ew.Close(); err != nil {
		return m, err
	}
	if err := tmp.Sync(); err != nil {
		return m, fmt.Errorf("fsync export file: %w", err)
	}
	if err := os.Rename(tmp.Name(), filepath.Join(dir, m.File)); err != nil {
		return m, fmt.Errorf("name export file: %w", err)
	}
	ew.Fill(&m)
	b, err := auditlog.EncodeManifest(m)
	if err != nil {
		return m, fmt.Errorf("encode manifest: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(dir, auditlog.ManifestName(m.File)), b); err != nil {
		return m, fmt.Errorf("write manifest: %w", err)
	}
	return m, nil
}

// PurgeAudit applies ORCH_AUDIT_RETENTION_DAYS: it deletes audit rows
// older than the retention that a verified export holds, and returns how
// many. Nothing is deleted when the chain on disk does not verify, or an
// export's file is not the one recorded in Postgres.
func (ax *AuditExports) PurgeAudit(ctx context.Context) (int64, error) {
	if ax.cfg.Retention <= 0 {
		return 0, nil
	}
	cutoff := time.Now().Add(-ax.cfg.Retention)
	q := schema.New(ax.pool)
	cands, err := q.PurgeCandidates(ctx, cutoff)
	if err != nil || len(cands) == 0 {
		return 0, err
	}
	bySeq := map[int64]schema.AuditExport{}
	var through int64
	for _, c := range cands {
		bySeq[*c.Seq] = c
		through = max(through, *c.Seq)
	}
	ids := map[int64][]int64{}
	var mismatch error
	_, err = auditlog.Verify(ax.cfg.ExportDir, auditlog.VerifyOptions{Through: through, OnRow: func(m auditlog.Manifest, r auditlog.Row) error {
		c, ok := bySeq[m.Seq]
		if !ok {
			return nil
		}
		if c.SHA256 != m.SHA256 || c.ID != m.ExportID {
			if mismatch == nil {
				mismatch = fmt.Errorf("export %d on disk (%s) is not the one recorded in the database (%s)", m.Seq, m.SHA256, c.SHA256)
			}
			return nil
		}
		if r.Timestamp.Before(cutoff) {
			ids[m.Seq] = append(ids[m.Seq], r.ID)
		}
		return nil
	}})
	if err != nil {
		return 0, fmt.Errorf("audit purge skipped, the export chain does not verify: %w", err)
	}
	if mismatch != nil {
		return 0, fmt.Errorf("audit purge skipped: %w", mismatch)
	}
	var total int64
	for _, c := range cands {
		batch := ids[*c.Seq]
		done := !c.To.After(cutoff) // every row of the export is past retention
		if len(batch) == 0 && !done {
			continue
		}
		for {
			part := batch[:min(len(batch), 10000)]
			batch = batch[len(part):]
			err := inTx(ctx, ax.pool, func(tx pgx.Tx) error {
				tq := schema.New(tx)
				n, err := tq.PurgeAudit(ctx, part, cutoff)
				if err != nil {
					return err
				}
				total += n
				return tq.RecordPurge(ctx, c.ID, n, done && len(batch) == 0)
			})
			if err != nil {
				return total, err
			}
			if len(batch) == 0 {
				break
			}
		}
	}
	return total, nil
}
