package jobs

import (
	"time"

	"github.com/riverqueue/river"
)

// AuditExport writes one audit export, a gzip JSONL file and its manifest
// in ORCH_AUDIT_EXPORT_DIR, appended to the export hash chain.
// On demand (POST /audit/exports) it names the audit_exports row; on
// schedule (ORCH_AUDIT_EXPORT_CRON) it carries the tick, covers the rows
// since the previous scheduled export up to the tick, and then applies the
// retention purge (ORCH_AUDIT_RETENTION_DAYS).
type AuditExport struct {
	ExportID string    `json:"export_id,omitempty" river:"unique"`
	Tick     time.Time `json:"tick,omitzero" river:"unique"`
}

// Kind is the permanent wire name.
func (AuditExport) Kind() string { return "audit_export" }

// InsertOpts: on the fleet queue; unique per export or tick.
func (AuditExport) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueFleet, MaxAttempts: 5, UniqueOpts: river.UniqueOpts{ByArgs: true}}
}
