.PHONY: build test demo container-test
build:
	swift build
test:
	scripts/test.sh
demo:
	scripts/demo.sh
container-test:
	scripts/container-test.sh
