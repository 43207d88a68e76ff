package api

import (
	"context"
	"net/http"
	"time"

	"github.com/danielgtaylor/huma/v2"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema"
)

// Backups: take one now, list them, restore one. A backup is
// an operation like the others (it waits, or answers 202 with Prefer:
// respond-async), but it does not take the engine's operation slot: a
// start or stop requested meanwhile is not refused, it runs after the
// copy (the worker's lease on the engine serializes them).

// BackupBody is a backup as the API shows it.
type BackupBody struct {
	BackupID      string    `json:"backup_id" format:"uuid"`
	EngineID      string    `json:"engine_id" format:"uuid" doc:"The engine that took it; it may have been destroyed since"`
	UserID        string    `json:"user_id"`
	CreatedAt     time.Time `json:"created_at"`
	SizeBytes     int64     `json:"size_bytes" doc:"Size of the compressed archive"`
	SHA256        string    `json:"sha256" doc:"Hex SHA-256 of the archive, checked before any restore"`
	EngineVersion string    `json:"engine_version" doc:"The engine's image when the backup was taken"`
	Trigger       string    `json:"trigger" enum:"scheduled,manual"`
	PausedMS      int64     `json:"paused_ms" doc:"How long the engine was frozen for the copy"`
}

func toBackupBody(b schema.Backup) BackupBody {
	return BackupBody{BackupID: b.ID, EngineID: b.EngineID, UserID: b.UserID, CreatedAt: b.CreatedAt, SizeBytes: b.SizeBytes,
		SHA256: b.SHA256, EngineVersion: b.EngineVersion, Trigger: b.Trigger, PausedMS: b.PausedMS}
}

type listBackupsInput struct {
	UserID string `path:"user_id" doc:"The product's own user id: 1-128 characters of [A-Za-z0-9._@:|+=~-]"`
	Limit  int    `query:"limit" default:"100" minimum:"1" maximum:"1000"`
	Offset int    `query:"offset" default:"0" minimum:"0"`
}

type listBackupsOutput struct {
	Body struct {
		Backups []BackupBody `json:"backups"`
		Total   int          `json:"total"`
	}
}

// TakeBackupBody answers POST /engines/{user_id}/backups.
type TakeBackupBody struct {
	BackupID    string      `json:"backup_id" format:"uuid"`
	EngineID    string      `json:"engine_id" format:"uuid"`
	Status      string      `json:"status" enum:"pending,running,succeeded" doc:"succeeded once the backup is written and recorded"`
	OperationID string      `json:"operation_id,omitempty" doc:"Set with Prefer: respond-async; follow it with GET /operations/{id}"`
	Backup      *BackupBody `json:"backup,omitempty" doc:"The backup, once succeeded"`
}

type takeBackupOutput struct {
	Status int
	Body   TakeBackupBody
}

type restoreInput struct {
	UserID string `path:"user_id" doc:"The product's own user id: 1-128 characters of [A-Za-z0-9._@:|+=~-]"`
	Prefer string `header:"Prefer" doc:"respond-async: answer 202 with an operation_id at once instead of waiting"`
	Body   struct {
		BackupID string `json:"backup_id" format:"uuid" doc:"A backup of this user, taken by this engine or an earlier one (destroyed since)"`
	}
}

func (s *Server) registerBackups() {
	huma.Register(s.api, s.op(huma.Operation{
		OperationID: "list-backups", Method: http.MethodGet, Path: "/engines/{user_id}/backups",
		Summary:     "List a user's brain backups, newest first",
		Description: "Every backup of the user's brain the retention keeps, including those taken by an engine of this user that was destroyed since (they can be restored into the user's new engine).",
		Metadata:    codes(),
	}), func(ctx context.Context, in *listBackupsInput) (*listBackupsOutput, error) {
		bs, total, err := schema.New(s.pool).ListUserBackups(ctx, productFrom(ctx).ID, in.UserID, in.Limit, in.Offset)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		out := &listBackupsOutput{}
		out.Body.Backups = make([]BackupBody, 0, len(bs))
		for _, b := range bs {
			out.Body.Backups = append(out.Body.Backups, toBackupBody(b))
		}
		out.Body.Total = total
		return out, nil
	})

	huma.Register(s.api, s.op(huma.Operation{
		OperationID: "take-backup", Method: http.MethodPost, Path: "/engines/{user_id}/backups",
		Summary:     "Back up a user's brain now",
		Description: "Freezes the engine for the copy (well under a second for a 100 MB brain), then compresses and hashes it; on the kubernetes backend the backup is the running engine's own export (ENGINE_NOT_RUNNING when it is stopped). Returns when the backup is recorded, or 202 with Prefer: respond-async. A request while one is in flight joins it.",
		Metadata:    waits(orch.CodeEngineNotFound, orch.CodeBackupNotFound, orch.CodeEngineNotRunning),
	}), func(ctx context.Context, in *userOpInput) (*takeBackupOutput, error) {
		p := productFrom(ctx)
		e, opID, backupID, err := s.core.TakeBackup(ctx, p, in.UserID, "")
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		if wantsAsync(in.Prefer) {
			return &takeBackupOutput{Status: http.StatusAccepted, Body: TakeBackupBody{BackupID: backupID, EngineID: e.ID,
				Status: string(orch.OpPending), OperationID: opID}}, nil
		}
		if err := s.core.Wait(ctx, p.ID, opID, s.core.WaitTimeout(orch.OpBackup)); err != nil {
			return nil, toHTTP(ctx, err)
		}
		b, err := schema.New(s.pool).BackupByID(ctx, backupID)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		body := toBackupBody(b)
		return &takeBackupOutput{Status: http.StatusOK, Body: TakeBackupBody{BackupID: b.ID, EngineID: b.EngineID,
			Status: string(orch.OpSucceeded), Backup: &body}}, nil
	})

	huma.Register(s.api, s.op(huma.Operation{
		OperationID: "restore-backup", Method: http.MethodPost, Path: "/engines/{user_id}/restore",
		Summary:     "Restore a backup into the user's engine",
		Description: "Verifies the backup's SHA-256 first (BACKUP_CORRUPT: nothing is changed), stops the engine, keeps a safety copy of its current brain, replaces the brain with the backup's and starts the engine; if that fails the previous brain is put back. Any backup of this user is accepted, also one taken by an engine destroyed since (disaster recovery).",
		Metadata:    waits(orch.CodeEngineNotFound, orch.CodeBackupNotFound, orch.CodeBackupCorrupt),
	}), func(ctx context.Context, in *restoreInput) (*opOutput, error) {
		p := productFrom(ctx)
		e, opID, err := s.core.Restore(ctx, p, in.UserID, in.Body.BackupID, "")
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		if wantsAsync(in.Prefer) {
			return &opOutput{Status: http.StatusAccepted, Body: OpBody{EngineID: e.ID, Status: string(e.Status), URL: s.core.URL(e), OperationID: opID}}, nil
		}
		if e, err = s.core.Await(ctx, p.ID, e, opID, orch.OpRestore); err != nil {
			return nil, toHTTP(ctx, err)
		}
		return &opOutput{Status: http.StatusOK, Body: OpBody{EngineID: e.ID, Status: string(e.Status), URL: s.core.URL(e)}}, nil
	})
}
