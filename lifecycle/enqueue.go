// Package lifecycle is the request side of the engine lifecycle, shared by
// the HTTP API, the CLI and the workers' own system operations: every
// operation is recorded and its job enqueued here, in the caller's
// transaction.
package lifecycle

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema"
)

// Inserter is the part of a River client that enqueues within a
// transaction (an insert-only client is enough).
type Inserter interface {
	InsertTx(ctx context.Context, tx pgx.Tx, args river.JobArgs, opts *river.InsertOpts) (*rivertype.JobInsertResult, error)
}

// Enqueue inserts op's job and records op (pending, worked by that job,
// ending by its deadline) within tx: commit = the work will happen,
// rollback = nothing happened. op.Deadline must be set (see
// orch.OperationDeadline). Errors: OPERATION_IN_PROGRESS when River
// refuses the job as a duplicate of one in flight, INTERNAL_ERROR when the
// job cannot be inserted (the transaction must then be rolled back).
func Enqueue(ctx context.Context, tx pgx.Tx, rc Inserter, op orch.Operation, payload schema.OpPayload, args river.JobArgs, opts *river.InsertOpts) error {
	if op.Deadline.IsZero() {
		return errors.New("enqueue operation: no deadline")
	}
	if rc == nil {
		return errors.New("enqueue operation: no river client")
	}
	if op.ProductID != "" && (opts == nil || opts.Priority == 0) {
		n, err := schema.New(tx).UnfinishedOperations(ctx, op.ProductID, busyProduct)
		if err != nil {
			return err
		}
		o := river.InsertOpts{}
		if opts != nil {
			o = *opts
		}
		o.Priority = Priority(n)
		opts = &o
	}
	res, err := rc.InsertTx(ctx, tx, args, opts)
	if err != nil {
		return &orch.Error{Code: orch.CodeInternal, Message: "could not enqueue the operation", Err: err}
	}
	if res.UniqueSkippedAsDuplicate {
		// Cannot happen for a fresh operation id; refuse rather than leave
		// an operation no job will ever run.
		return orch.Errorf(orch.CodeOperationInProgress, "an operation is already queued for this engine")
	}
	return schema.New(tx).InsertOperation(ctx, op, payload, res.Job.ID)
}

// busyProduct is the number of operations in flight from which a
// product's new jobs take the lowest priority.
const busyProduct = 64

// Priority is the River priority (1 first … 4 last) of a job whose product
// has inFlight operations pending or running: fairness between products
// on a node's queue. River fetches by priority, then in order, so a
// product's burst of hundreds of provisions queues behind another
// product's single admit instead of in front of it, while a product with
// a handful in flight is never slowed; within a product the order is
// kept. A burst's jobs keep the priority they were given (no ageing):
// they wait only while quieter products have work.
func Priority(inFlight int) int {
	switch {
	case inFlight < 4:
		return 1
	case inFlight < 16:
		return 2
	case inFlight < busyProduct:
		return 3
	}
	return 4
}

// Deadline is the deadline of an operation whose job is inserted now with
// opts (a scheduled job starts later).
func Deadline(opts *river.InsertOpts, bootTimeout time.Duration) time.Time {
	start := time.Now()
	if opts != nil && opts.ScheduledAt.After(start) {
		start = opts.ScheduledAt
	}
	return orch.OperationDeadline(start, bootTimeout)
}
