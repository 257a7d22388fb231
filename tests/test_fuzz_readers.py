"""Every reader, fuzzed through the per-file guard for a fixed number of generated inputs: nothing escapes."""

import importlib.util

from conftest import REPO

N = 20  # per reader; bench/fuzz_readers.py runs more


def test_fuzzed_inputs_never_escape_the_guard():
    spec = importlib.util.spec_from_file_location("fuzz_readers", REPO / "bench" / "fuzz_readers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.fuzz(N)
    assert set(results) == {"txt", "md", "html", "pdf", "docx", "rst", "pod", "man"}
    for reader, r in results.items():
        assert r["inputs"] == N, (reader, r)
        assert r["escaped"] == 0, (reader, r["escaped_examples"])
        assert r["documents"] + r["rejected"] == N
    assert sum(r["documents"] for r in results.values()) > 0  # the strategies also make readable files
