# referral-rewards. `make help` lists the targets.

SHELL := /bin/bash
CARGO ?= cargo
# Cargo's target directory: CARGO_TARGET_DIR when it is set, as for cargo itself.
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
BIN := $(TARGET_DIR)/debug/referral-rewards

# PostgreSQL for the tests: every development and CI machine runs one here.
export REFERRAL_REWARDS_TEST_PG_URL ?= postgres://postgres@127.0.0.1:5432/test

DEMO_DB := $(TARGET_DIR)/demo/referral-rewards.db
DEMO_URL := sqlite://$(DEMO_DB)
DEMO_USERS ?= 100000
DEMO_AS_OF := 2026-11-01T00:00:00Z
# The demo's config: config.toml with its two example grant programs enabled.
DEMO_CONFIG := $(TARGET_DIR)/demo/config.toml
DEMO := $(BIN) --config $(DEMO_CONFIG) --database-url $(DEMO_URL)

# The benchmark's PostgreSQL server (its datasets are databases rr_bench_<users>).
export REFERRAL_REWARDS_BENCH_PG_URL ?= postgres://postgres@127.0.0.1:5432/test

# make install: the binary, its man pages and its bash, zsh and fish completions under
# $(DESTDIR)$(PREFIX), built with INSTALL_PROFILE (release; dev for a quick check).
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
DATADIR ?= $(PREFIX)/share
MANDIR ?= $(DATADIR)/man
INSTALL_PROFILE ?= release
INSTALL_BIN := $(TARGET_DIR)/$(if $(filter dev,$(INSTALL_PROFILE)),debug,$(INSTALL_PROFILE))/referral-rewards
BASH_COMPLETIONS := $(DATADIR)/bash-completion/completions/referral-rewards
ZSH_COMPLETIONS := $(DATADIR)/zsh/site-functions/_referral-rewards
FISH_COMPLETIONS := $(DATADIR)/fish/vendor_completions.d/referral-rewards.fish

.PHONY: help build demo test chromium lint fmt bench install uninstall

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

build: ## Build the binary (dev profile)
	$(CARGO) build --bin referral-rewards

demo: build ## Synthetic SQLite database, a dry-run audit, an apply, the summaries
	@rm -f $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm $(DEMO_DB).lock; mkdir -p $(dir $(DEMO_DB))
	@sed -e '/^# \[\[grants\]\]/,$$ s/^# //' config.toml > $(DEMO_CONFIG)
	$(DEMO) demo-data --users $(DEMO_USERS) --seed 42 --anchor $(DEMO_AS_OF)
	@echo; echo "== dry run: what a run would write, and why (writes nothing); the slots program and two grant programs"
	$(DEMO) reconcile --dry-run --as-of $(DEMO_AS_OF) --html $(dir $(DEMO_DB))audit.html --save-plan $(dir $(DEMO_DB))plan.json
	@echo; echo "== the plan's changes, grouped (the first 3 of each group)"
	$(BIN) plan show $(dir $(DEMO_DB))plan.json --limit 3
	@echo; echo "== apply"
	$(DEMO) reconcile --as-of $(DEMO_AS_OF)
	@echo; echo "== apply again: nothing left to write, nothing granted twice"
	$(DEMO) reconcile --as-of $(DEMO_AS_OF)
	@echo; echo "== why did referrer 2611's referrals count or not?"
	$(DEMO) explain --referrer 2611 --as-of $(DEMO_AS_OF)
	@echo; echo "== run history"
	$(DEMO) runs
	@echo; echo "The demo database is $(DEMO_DB), its config $(DEMO_CONFIG);"
	@echo "open $(dir $(DEMO_DB))audit.html in a browser for the audit page."

test: chromium ## Every test: unit, SQLite and PostgreSQL integration, CLI, serve, property tests, the audit page in Chromium
	REFERRAL_REWARDS_TEST_CHROMIUM="$$(command -v chromium || true)" $(CARGO) test --lib --bins --tests

# The audit page's browser test runs headless Chromium: Debian's package, installed where missing
# (as root, or through sudo).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	    echo "installing Debian's chromium for the audit page's browser test"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	    $$SUDO apt-get install -y --no-install-recommends chromium >/dev/null \
	    || { $$SUDO apt-get update >/dev/null && $$SUDO apt-get install -y --no-install-recommends chromium >/dev/null; } \
	    || echo "could not install chromium: the browser test fails under CI=true and is skipped elsewhere"; }

bench: ## Release build; 100k and 1M datasets (cached); figures per backend (BENCH_SIZES, BENCH_BACKENDS, BENCH_PARTS)
	$(CARGO) bench --bench reconcile

lint: ## cargo fmt --check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

install: ## Build (release) and install the binary, man pages and completions (PREFIX, DESTDIR)
	$(CARGO) build --bin referral-rewards --profile $(INSTALL_PROFILE)
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man1 $(dir $(DESTDIR)$(BASH_COMPLETIONS)) \
	    $(dir $(DESTDIR)$(ZSH_COMPLETIONS)) $(dir $(DESTDIR)$(FISH_COMPLETIONS))
	install -m 755 $(INSTALL_BIN) $(DESTDIR)$(BINDIR)/referral-rewards
	$(INSTALL_BIN) man --dir $(DESTDIR)$(MANDIR)/man1
	$(INSTALL_BIN) completions bash > $(DESTDIR)$(BASH_COMPLETIONS)
	$(INSTALL_BIN) completions zsh > $(DESTDIR)$(ZSH_COMPLETIONS)
	$(INSTALL_BIN) completions fish > $(DESTDIR)$(FISH_COMPLETIONS)

uninstall: ## Remove what make install installed (same PREFIX, DESTDIR)
	rm -f $(DESTDIR)$(BINDIR)/referral-rewards $(DESTDIR)$(MANDIR)/man1/referral-rewards.1 \
	    $(DESTDIR)$(MANDIR)/man1/referral-rewards-*.1 $(DESTDIR)$(BASH_COMPLETIONS) \
	    $(DESTDIR)$(ZSH_COMPLETIONS) $(DESTDIR)$(FISH_COMPLETIONS)
