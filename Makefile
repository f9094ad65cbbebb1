# The two commands of the README. Both install what they need into .venv first.
.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/senmon demo

test: setup
	bash scripts/chromium.sh
	bash scripts/ssh_host.sh
	.venv/bin/python -m pytest -n 2 --dist loadgroup

bench: setup
	.venv/bin/python -m bench
