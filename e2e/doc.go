// Package e2e holds the end-to-end tests: a whole orchestrator (API, River
// workers, a real backend) on a fresh Postgres database, driven over real
// HTTP, with real engines (processes or Docker containers).
package e2e
