package api

import (
	"context"
	"net/http"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/auditlog"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/schema"
)

// The audit log: a product reads its own rows; the admin
// exports the log into the hash-chained files of ORCH_AUDIT_EXPORT_DIR.

// AuditEntryBody is one audit row.
type AuditEntryBody struct {
	ID         int64          `json:"id"`
	Timestamp  time.Time      `json:"timestamp"`
	UserID     string         `json:"user_id,omitempty"`
	EngineID   string         `json:"engine_id,omitempty"`
	Action     string         `json:"action"`
	Actor      string         `json:"actor" doc:"system, admin or the product's slug"`
	Metadata   map[string]any `json:"metadata"`
	DurationMS *int64         `json:"duration_ms,omitempty"`
}

type auditInput struct {
	UserID string    `query:"user_id" doc:"Only this user's rows"`
	Action string    `query:"action" doc:"Only this action (provision, start, backup, …)"`
	Since  time.Time `query:"since" doc:"Rows at or after this time (RFC 3339)"`
	Until  time.Time `query:"until" doc:"Rows before this time (RFC 3339)"`
	Limit  int       `query:"limit" default:"100" minimum:"1" maximum:"1000"`
}

type auditOutput struct {
	Body struct {
		Entries []AuditEntryBody `json:"entries" doc:"Newest first"`
	}
}

// AuditExportBody is an audit export as GET /audit/exports/{id} shows it.
type AuditExportBody struct {
	ExportID   string     `json:"export_id" format:"uuid"`
	Status     string     `json:"status" enum:"pending,running,succeeded,failed"`
	Trigger    string     `json:"trigger" enum:"scheduled,manual"`
	ProductID  string     `json:"product_id,omitempty" doc:"Only this product's rows; absent: every product"`
	From       time.Time  `json:"from" doc:"Rows with from <= timestamp < to"`
	To         time.Time  `json:"to"`
	Seq        *int64     `json:"seq,omitempty" doc:"Position in the export hash chain"`
	File       string     `json:"file,omitempty" doc:"Data file (gzip JSONL) in ORCH_AUDIT_EXPORT_DIR"`
	Manifest   string     `json:"manifest,omitempty" doc:"Its manifest, next to it"`
	SHA256     string     `json:"sha256,omitempty"`
	PrevSHA256 string     `json:"prev_sha256,omitempty" doc:"The previous export's sha256 (the chain link)"`
	RowCount   *int64     `json:"row_count,omitempty"`
	SizeBytes  *int64     `json:"size_bytes,omitempty"`
	Error      string     `json:"error,omitempty"`
	PurgedRows int64      `json:"purged_rows" doc:"Rows of this export the retention purge has deleted from the database"`
	CreatedAt  time.Time  `json:"created_at"`
	FinishedAt *time.Time `json:"finished_at,omitempty"`
}

func toExportBody(x schema.AuditExport) AuditExportBody {
	b := AuditExportBody{ExportID: x.ID, Status: string(x.Status), Trigger: x.Trigger, ProductID: x.ProductID,
		From: x.From, To: x.To, Seq: x.Seq, File: x.File, SHA256: x.SHA256, PrevSHA256: x.PrevSHA256,
		RowCount: x.RowCount, SizeBytes: x.SizeBytes, Error: x.Error, PurgedRows: x.PurgedRows,
		CreatedAt: x.CreatedAt, FinishedAt: x.FinishedAt}
	if x.File != "" {
		b.Manifest = auditlog.ManifestName(x.File)
	}
	return b
}

type createExportInput struct {
	Body struct {
		From      time.Time `json:"from" doc:"Start of the range (inclusive, RFC 3339)"`
		To        time.Time `json:"to" doc:"End of the range (exclusive, RFC 3339); not in the future"`
		ProductID string    `json:"product_id,omitempty" format:"uuid" doc:"Only this product's rows"`
	}
}

type exportOutput struct {
	Status int
	Body   AuditExportBody
}

type listExportsOutput struct {
	Body struct {
		Exports []AuditExportBody `json:"exports" doc:"Newest first"`
	}
}

func (s *Server) registerAudit() {
	huma.Register(s.api, huma.Operation{
		OperationID: "list-audit", Method: http.MethodGet, Path: "/audit",
		Summary:     "The product's audit log, newest first",
		Description: "Every action taken on the product's engines, by the product, the admin or the system, failures included.",
		Security:    platformSecurity, Tags: []string{"audit"}, Metadata: codes(),
	}, func(ctx context.Context, in *auditInput) (*auditOutput, error) {
		f := schema.AuditFilter{ProductID: productFrom(ctx).ID, UserID: in.UserID, Action: in.Action, Limit: in.Limit}
		if in.Action != "" && !orch.Action(in.Action).Known() {
			return nil, toHTTP(ctx, orch.Errorf(orch.CodeInvalidRequest, "unknown action %q", in.Action))
		}
		if !in.Since.IsZero() {
			f.Since = &in.Since
		}
		if !in.Until.IsZero() {
			f.Until = &in.Until
		}
		es, err := schema.New(s.pool).ListAudit(ctx, f)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		out := &auditOutput{}
		out.Body.Entries = make([]AuditEntryBody, 0, len(es))
		for _, e := range es {
			if e.Metadata == nil {
				e.Metadata = map[string]any{}
			}
			out.Body.Entries = append(out.Body.Entries, AuditEntryBody{ID: e.ID, Timestamp: e.Timestamp, UserID: e.UserID,
				EngineID: e.EngineID, Action: string(e.Action), Actor: e.Actor, Metadata: e.Metadata, DurationMS: e.DurationMS})
		}
		return out, nil
	})

	huma.Register(s.api, huma.Operation{
		OperationID: "create-audit-export", Method: http.MethodPost, Path: "/audit/exports",
		Summary:     "Export a range of the audit log now",
		Description: "Writes the rows with from <= timestamp < to (of one product, or all) as a gzip JSONL file with a manifest into ORCH_AUDIT_EXPORT_DIR, appended to the export hash chain. Answers 202; follow it with GET /audit/exports/{export_id}.",
		Security:    adminSecurity, Tags: []string{"audit"}, Metadata: codes(orch.CodeProductNotFound),
		DefaultStatus: http.StatusAccepted,
	}, func(ctx context.Context, in *createExportInput) (*exportOutput, error) {
		x, err := s.requestExport(ctx, in.Body.From, in.Body.To, in.Body.ProductID)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		return &exportOutput{Status: http.StatusAccepted, Body: toExportBody(x)}, nil
	})

	huma.Register(s.api, huma.Operation{
		OperationID: "list-audit-exports", Method: http.MethodGet, Path: "/audit/exports",
		Summary:     "Audit exports, newest first",
		Description: "Scheduled and manual exports with their status and place in the hash chain. The newest succeeded export's seq and sha256 are the anchor `orchestrator audit verify --head SEQ:SHA256` checks the files against.",
		Security:    adminSecurity, Tags: []string{"audit"}, Metadata: codes(),
	}, func(ctx context.Context, in *struct {
		Limit int `query:"limit" default:"50" minimum:"1" maximum:"500"`
	}) (*listExportsOutput, error) {
		xs, err := schema.New(s.pool).ListAuditExports(ctx, in.Limit)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		out := &listExportsOutput{}
		out.Body.Exports = make([]AuditExportBody, 0, len(xs))
		for _, x := range xs {
			out.Body.Exports = append(out.Body.Exports, toExportBody(x))
		}
		return out, nil
	})

	huma.Register(s.api, huma.Operation{
		OperationID: "get-audit-export", Method: http.MethodGet, Path: "/audit/exports/{export_id}",
		Summary:  "Follow an audit export",
		Security: adminSecurity, Tags: []string{"audit"}, Metadata: codes(orch.CodeExportNotFound),
	}, func(ctx context.Context, in *struct {
		ID string `path:"export_id"`
	}) (*exportOutput, error) {
		x, err := schema.New(s.pool).AuditExportByID(ctx, in.ID)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		return &exportOutput{Status: http.StatusOK, Body: toExportBody(x)}, nil
	})
}

// requestExport records a manual export and enqueues its job in one
// transaction. Errors: INVALID_REQUEST (empty or future range),
// PRODUCT_NOT_FOUND.
func (s *Server) requestExport(ctx context.Context, from, to time.Time, productID string) (schema.AuditExport, error) {
	var x schema.AuditExport
	switch {
	case from.IsZero() || to.IsZero():
		return x, orch.Errorf(orch.CodeInvalidRequest, "from and to are required")
	case !from.Before(to):
		return x, orch.Errorf(orch.CodeInvalidRequest, "from must be before to")
	case to.After(time.Now()):
		return x, orch.Errorf(orch.CodeInvalidRequest, "to must not be in the future")
	}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		q := schema.New(tx)
		if productID != "" {
			if _, err := q.GetProduct(ctx, productID); err != nil {
				return err
			}
		}
		var err error
		x, err = q.InsertAuditExport(ctx, schema.AuditExport{ID: uuid.NewString(), ProductID: productID,
			From: from.UTC(), To: to.UTC(), Trigger: schema.ExportManual, RequestedBy: orch.ActorAdmin})
		if err != nil {
			return err
		}
		if _, err := s.river.InsertTx(ctx, tx, jobs.AuditExport{ExportID: x.ID}, nil); err != nil {
			return &orch.Error{Code: orch.CodeInternal, Message: "could not enqueue the export", Err: err}
		}
		return nil
	})
	return x, err
}
