# The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
GO ?= go
BUILD := .build
LDFLAGS := -s -w -X main.version=$(VERSION)
FUZZTIME ?= 60s

.PHONY: run test fuzz loadtest bench gen image lint build engine-image orchestrator-image pg-stop clean kube

build: ## static binaries in .build/
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BUILD)/orchestrator ./cmd/orchestrator
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BUILD)/engine ./cmd/engine

run: build ## a whole local fleet: Postgres under .data/, migrations, all roles in the foreground
	@scripts/run.sh

test: kube ## the whole suite against a throwaway Postgres (or ORCH_TEST_DATABASE_URL) and a cached Kubernetes control plane, then `make fuzz`
	@mkdir -p .data && url="$${ORCH_TEST_DATABASE_URL:-$$(scripts/pg.sh)}" && \
	ORCH_TEST_DATABASE_URL="$$url" $(GO) test -count=1 -timeout 45m -p 2 ./... 2>&1 | tee .data/test.log; \
	rc=$${PIPESTATUS[0]}; [ $$rc -eq 0 ] || exit $$rc; \
	ORCH_TEST_DATABASE_URL="$$url" $(MAKE) --no-print-directory fuzz

fuzz: ## FUZZTIME (60s) of fuzzing the API (FuzzAPI: a real server on a real database); findings land in api/testdata/fuzz
	@mkdir -p .data && url="$${ORCH_TEST_DATABASE_URL:-$$(scripts/pg.sh)}" && \
	ORCH_TEST_DATABASE_URL="$$url" $(GO) test -run '^$$' -fuzz '^FuzzAPI$$' -fuzztime $(FUZZTIME) ./api 2>&1 | tee .data/fuzz.log; \
	exit $${PIPESTATUS[0]}

loadtest: ## a real `orchestrator serve` flooded with bad platform keys: its RSS must stay flat
	@mkdir -p .data && url="$${ORCH_TEST_DATABASE_URL:-$$(scripts/pg.sh)}" && \
	ORCH_TEST_DATABASE_URL="$$url" ORCH_LOADTEST=1 $(GO) test -count=1 -v -run '^TestServeBadAuthFloodRSS$$' -timeout 20m ./cmd/orchestrator 2>&1 | \
	grep -E '^(---|ok|FAIL|\s+loadtest_test)'; exit $${PIPESTATUS[0]}

bench: ## benchmarks side by side with their baselines, printed as a table
	@mkdir -p .data && url="$${ORCH_TEST_DATABASE_URL:-$$(scripts/pg.sh)}" && { \
	ORCH_TEST_DATABASE_URL="$$url" $(GO) test -run '^$$' -bench . -benchtime 2s ./api && \
	ORCH_TEST_DATABASE_URL="$$url" $(GO) test -run '^$$' -bench . -benchtime 1x -timeout 60m $$($(GO) list ./... | grep -v '/api$$'); \
	} 2>&1 | grep -E '^(Benchmark|ok|FAIL|---)' | tee .data/bench.log

gen: ## regenerate the sqlc queries, openapi.yaml, its 3.0 rendering, the Go SDK and its error sentinels, docs/api.md
	cd schema && $(GO) tool sqlc generate
	$(GO) test ./api -run 'OpenAPIGolden|APIDocGolden' -update >/dev/null
	cd sdk/go && $(GO) tool oapi-codegen -config oapi-codegen.yaml openapi-3.0.yaml
	$(GO) test ./sdk/go -run ErrorsGenFresh -update >/dev/null

image: engine-image orchestrator-image ## enginefleet/engine:$(VERSION) and enginefleet/orchestrator:$(VERSION), FROM scratch

engine-image: build
	@c=$(BUILD)/ctx-engine && rm -rf $$c && mkdir -p $$c/rootfs && cp $(BUILD)/engine $$c/engine && \
	cp -a deploy/engine-rootfs/. $$c/rootfs/ && mv $$c/rootfs/data $$c/data && chmod 1777 $$c/rootfs/tmp
	docker build -q -f deploy/engine.Dockerfile -t enginefleet/engine:$(VERSION) $(BUILD)/ctx-engine

orchestrator-image: build
	@rm -rf $(BUILD)/ctx-orch && mkdir -p $(BUILD)/ctx-orch/var/lib/enginefleet/backups $(BUILD)/ctx-orch/var/lib/enginefleet/audit-exports && \
	cp $(BUILD)/orchestrator $(BUILD)/ctx-orch/orchestrator
	docker build -q -f deploy/orchestrator.Dockerfile -t enginefleet/orchestrator:$(VERSION) $(BUILD)/ctx-orch

lint: ## gofmt + go vet + generated queries up to date
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet ./...
	cd schema && $(GO) tool sqlc diff

kube: ## the kubernetes backend's test control plane (etcd, kube-apiserver, scheduler, controller-manager, kwok), built once into ~/.cache
	@scripts/kube.sh

pg-stop: ## stop the throwaway Postgres
	@scripts/pg.sh stop

clean:
	rm -rf $(BUILD)
