.PHONY: build test demo
build:
	swift build
test:
	scripts/test.sh
