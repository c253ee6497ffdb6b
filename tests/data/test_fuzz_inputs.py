"""Fuzzing every reader of outside input: the TFRecord reader, the Scenario parser, the rollouts
readers (binproto and submission tar.gz) and the checkpoint loader.

Each reader gets real files with truncations (random, and at every kind of boundary: record
headers, record ends, protobuf fields, tar blocks, zip records), single and multiple bit flips,
random bytes and random bytes behind a valid header. Each case must end in the reader's one
documented error, a ValueError (RecordError for TFRecords and Scenarios) on one line naming the
file (and the record index), or in a clean read; any other exception fails the test with
hypothesis' smallest example, and so does a case running over CASE_SECONDS (a hang).

Budgets are fixed and deterministic (`derandomize=True`); the number of cases each reader tried
is printed (`[fuzz] ...` lines, shown even without `-s`) and checked against its budget.
"""

from __future__ import annotations

import gzip
import io
import signal
import struct
import tarfile
import time
import tracemalloc
import zipfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from waymo_open_dataset.protos import scenario_pb2

from smart_r1.data.tfrecord import RecordError, masked_crc, read_records, write_records
from smart_r1.data.womd import parse_scenario, read_scenario_protos
from smart_r1.evaluation import submission
from smart_r1.metrics import rollouts_io
from smart_r1.model.checkpoint import checkpoint_extra, load_checkpoint, save_checkpoint
from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.tokens.motion_vocab import NUM_TYPES, SHIFT, MotionVocab

CASE_SECONDS = 10.0  # a case takes well under a second; more than this is a hang
# SIGALRM interrupts Python code only: a hang inside C code (protobuf, zlib, torch) is caught by
# pytest-timeout's thread method instead, which ends the whole run with every thread's stack.
pytestmark = pytest.mark.timeout(300, method="thread")
SCENARIO_ID = "637f20cafde22ff8"  # the real WOMD scenario and the official test submission's


class CaseTimeout(BaseException):
    """A case ran over its time bound (BaseException: hypothesis must not retry it while shrinking)."""


@contextmanager
def time_bound(seconds: float, what: str):
    def on_alarm(signum, frame):
        raise CaseTimeout(f"{what}: still running after {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def describe(case) -> str:
    text = repr(case)
    return text if len(text) < 200 else text[:200] + "..."


def fuzz(capsys, reader: str, strategy, check, budget: int, extra_cases=()) -> None:
    """Run `check` on `budget` hypothesis cases plus `extra_cases`, each under CASE_SECONDS; print
    and check the count. `check(case)` returns "error" (a clean error) or "read"."""
    tally: Counter[str] = Counter()

    def one(case) -> None:
        with time_bound(CASE_SECONDS, f"{reader}: {describe(case)}"):
            tally[check(case)] += 1

    start = time.monotonic()
    for case in extra_cases:
        one(case)
    # No "explain" phase: it reruns failing cases under a tracer, slow enough to trip the time bound.
    settings(max_examples=budget, deadline=None, derandomize=True, database=None,
             phases=[Phase.explicit, Phase.generate, Phase.shrink],
             suppress_health_check=list(HealthCheck))(given(strategy)(one))()
    total = sum(tally.values())
    with capsys.disabled():
        print(f"\n[fuzz] {reader}: {total} cases tried ({tally['error']} clean errors, "
              f"{tally['read']} read) in {time.monotonic() - start:.1f} s")
    assert total >= budget + len(extra_cases)


def assert_clean(e: BaseException, path, kind: type, index: int | None = None) -> None:
    """The reader's own error type (not a subclass such as UnicodeDecodeError), one line, naming
    the file and the record index."""
    assert type(e) is kind, f"{type(e).__name__} instead of {kind.__name__}: {e}"
    message = str(e)
    assert str(path) in message, message
    assert "\n" not in message, message
    if index is not None:
        assert e.index == index and f"record {index}" in message, (index, message)


# --- mutations ------------------------------------------------------------------------------------

def mutate(data: bytes, case) -> bytes:
    kind, arg = case
    if kind == "cut":
        return data[:arg]
    if kind == "flip":
        out = bytearray(data)
        for bit in arg:
            out[bit // 8] ^= 1 << (bit % 8)
        return bytes(out)
    if kind == "random":
        return arg
    if kind == "header":  # the first bytes of the real input, then noise
        keep, tail = arg
        return data[:keep] + tail
    raise AssertionError(kind)


def mutations(data: bytes, boundaries=(), header: int = 64):
    """Truncations (anywhere, and at and next to each boundary), 1 to 8 bit flips, random bytes,
    and random bytes behind the input's first `header` bytes at most."""
    near = sorted({b + d for b in boundaries for d in (-1, 0, 1) if 0 <= b + d < len(data)})
    cuts = st.integers(0, len(data) - 1)
    if near:
        cuts = st.one_of(cuts, st.sampled_from(near))
    return st.one_of(
        cuts.map(lambda n: ("cut", n)),
        st.lists(st.integers(0, 8 * len(data) - 1), min_size=1, max_size=8, unique=True)
        .map(lambda bits: ("flip", tuple(bits))),
        st.binary(max_size=2048).map(lambda b: ("random", b)),
        st.tuples(st.integers(1, header), st.binary(max_size=2048)).map(lambda t: ("header", t)),
    )


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("bad varint")
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def field_boundaries(data: bytes, base: int = 0, depth: int = 2) -> list[int]:
    """Offsets (in the whole message) where protobuf fields start, down to `depth` levels of
    nested messages (a length-delimited field counts as a message when it walks as one)."""
    out, i = [], 0
    while i < len(data):
        out.append(base + i)
        key, i = _varint(data, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(data, i)
            if depth > 1:
                try:
                    out += field_boundaries(data[i:i + n], base + i, depth - 1)
                except ValueError:
                    pass
            i += n
        else:
            raise ValueError(f"wire type {wire}")
        if i > len(data):
            raise ValueError("field runs past the end")
    return out + [base + len(data)]


# --- inputs ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scenario_payload(womd_path) -> bytes:
    (payload,) = read_records(womd_path)
    return payload


@pytest.fixture(scope="module")
def submission_bytes() -> bytes:
    path = (Path(scenario_pb2.__file__).resolve().parents[1] / "utils" / "sim_agents" / "testdata"
            / "test_submission.binproto")
    return path.read_bytes()


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(path, bytes, state dict) of a small SMART-tiny checkpoint (`test` preset)."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("test")
    model = SmartTiny(cfg, MotionVocab(torch.randn(NUM_TYPES, cfg.vocab_size, SHIFT, 3)))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, {"stage": "bc", "epoch": 3})
    return path, path.read_bytes(), model.state_dict()


# --- the readers ----------------------------------------------------------------------------------

def test_case_time_bound_stops_a_hang():
    with pytest.raises(CaseTimeout, match="a hang"):
        with time_bound(0.2, "sleeper"):
            time.sleep(5)


def test_tfrecord_reader(tmp_path, scenario_payload, capsys):
    records = [scenario_payload, b"", b"a short third record"]
    source = tmp_path / "source.tfrecord"
    write_records(source, records)
    data = source.read_bytes()
    ends = [0]
    for r in records:
        ends.append(ends[-1] + 12 + len(r) + 4)
    assert ends[-1] == len(data)
    assert list(read_records(source)) == records  # valid input reads as before

    def record_at(offset: int) -> int:
        return next(k for k in range(len(records)) if offset < ends[k + 1])

    path = tmp_path / "case.tfrecord"

    def check(case) -> str:
        kind, arg = case
        if kind == "frame":  # a header with a valid length CRC, any length, then noise
            length, tail = arg
            head = struct.pack("<Q", length)
            path.write_bytes(head + struct.pack("<I", masked_crc(head)) + tail)
        else:
            path.write_bytes(mutate(data, case))
        tracemalloc.start()
        try:
            got = list(read_records(path))
        except ValueError as e:
            peak = tracemalloc.get_traced_memory()[1]
            if kind == "flip":
                expected = record_at(min(arg) // 8)
            elif kind == "cut":
                expected = record_at(arg)
            else:
                expected = None
            assert_clean(e, path, RecordError, expected)
            outcome = "error"
        else:
            peak = tracemalloc.get_traced_memory()[1]
            # Every byte of a TFRecord is covered by a CRC: a flip never reads; a cut reads only
            # at a record boundary, and then exactly the records before it.
            assert kind != "flip"
            assert kind != "cut" or arg in ends
            prefix = got == records[:len(got)]  # a bool: pytest's diff of megabytes takes longer than a case
            assert kind in ("random", "frame") or prefix
            outcome = "read"
        finally:
            tracemalloc.stop()
        # A corrupt length never makes the reader allocate more than the file holds, plus one
        # read chunk (16 MiB) and some slack.
        size = path.stat().st_size
        assert peak < size + (17 << 20), f"read of a {size}-byte file allocated {peak} bytes"
        return outcome

    # Truncation at every kind of boundary of every record: inside the length, inside its CRC,
    # at the data, inside the data, at and inside the data CRC, at the record's end.
    boundary_cuts = sorted({start + d for start, end in zip(ends, ends[1:])
                            for d in (*range(13), end - start - 5, end - start - 4, end - start - 1)}
                           | {1, len(data) - 1})
    frame = st.tuples(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([2**63, 2**40, 2**33, 2**31])),
                      st.binary(max_size=256)).map(lambda t: ("frame", t))
    fuzz(capsys, "TFRecord reader (read_records)", st.one_of(mutations(data, ends, header=12), frame),
         check, budget=600, extra_cases=[("cut", n) for n in boundary_cuts] + [("random", b"")])


def test_scenario_parser(tmp_path, scenario_payload, capsys):
    boundaries = field_boundaries(scenario_payload)
    path = tmp_path / "case.tfrecord"
    original = scenario_pb2.Scenario.FromString(scenario_payload)
    assert parse_scenario(scenario_payload).scenario_id == SCENARIO_ID  # valid input parses as before

    def check(case) -> str:
        if case[0] == "edit":
            proto = scenario_pb2.Scenario()
            proto.CopyFrom(original)
            edit(proto, case[1])
            data = proto.SerializeToString()
        else:
            data = mutate(scenario_payload, case)
        try:
            record = parse_scenario(data, path, 7)
        except ValueError as e:
            assert_clean(e, path, RecordError, 7)
            outcome = "error"
        else:
            assert isinstance(record.scenario_id, str)
            outcome = "read"
        write_records(path, [data])
        try:
            protos = list(read_scenario_protos(path))
        except ValueError as e:
            assert_clean(e, path, RecordError, 0)
            assert outcome == "error", "parse_scenario read a record that read_scenario_protos refuses"
        else:
            assert len(protos) == 1 and isinstance(protos[0].scenario_id, str)
        return outcome

    # Random values in a valid structure: the fields the parser indexes with or checks.
    int32 = st.integers(-2**31, 2**31 - 1)
    edits = st.one_of(
        st.tuples(st.just("sdc_track_index"), int32),
        st.tuples(st.just("current_time_index"), int32),
        st.tuples(st.just("tracks_to_predict"), int32),
        st.tuples(st.just("drop_state"), st.integers(0, len(original.tracks) - 1)),
        st.tuples(st.just("drop_timestamps"), st.integers(1, 91)),
        st.tuples(st.just("value"), st.integers(0, len(original.tracks) - 1),
                  st.sampled_from(["center_x", "heading", "velocity_x", "length"]),
                  st.sampled_from([float("nan"), float("inf"), -1e308])),
        st.tuples(st.just("clear_map_feature"), st.integers(0, len(original.map_features) - 1)),
        st.tuples(st.just("lane_state"), st.integers(0, 90), st.integers(-2**63, 2**63 - 1), st.integers(0, 8)),
    ).map(lambda e: ("edit", e))
    not_utf8 = ("random", b"\x2a\x01\xff")  # scenario_id (field 5) = b"\xff"
    fuzz(capsys, "Scenario parser (parse_scenario, read_scenario_protos)",
         st.one_of(mutations(scenario_payload, boundaries), edits), check, budget=120, extra_cases=[not_utf8])


def edit(proto: scenario_pb2.Scenario, change) -> None:
    what, *args = change
    if what in ("sdc_track_index", "current_time_index"):
        setattr(proto, what, args[0])
    elif what == "tracks_to_predict":
        proto.tracks_to_predict.add(track_index=args[0])
    elif what == "drop_state":
        del proto.tracks[args[0]].states[-1]
    elif what == "drop_timestamps":
        del proto.timestamps_seconds[-args[0]:]
    elif what == "value":
        track, field, value = args
        setattr(proto.tracks[track].states[50], field, value)
    elif what == "clear_map_feature":
        proto.map_features[args[0]].ClearField(proto.map_features[args[0]].WhichOneof("feature_data"))
    elif what == "lane_state":
        step, lane, state = args
        proto.dynamic_map_states[step].lane_states.add(lane=lane, state=state)


def test_rollouts_readers(tmp_path, submission_bytes, capsys):
    boundaries = field_boundaries(submission_bytes, depth=3)  # submission, scenario rollouts, joint scenes
    path = tmp_path / "case.binproto"
    path.write_bytes(submission_bytes)  # valid input reads as before
    assert rollouts_io.read_rollouts(path, SCENARIO_ID).scenario_id == SCENARIO_ID
    assert [r.scenario_id for r in submission.read_rollouts(path)] == [SCENARIO_ID]

    def check(case) -> str:
        path.write_bytes(mutate(submission_bytes, case))
        outcomes = set()
        for read in (lambda: [rollouts_io.read_rollouts(path, SCENARIO_ID)], lambda: submission.read_rollouts(path)):
            try:
                got = read()
            except ValueError as e:
                assert_clean(e, path, ValueError)
                outcomes.add("error")
            else:
                assert all(isinstance(r.scenario_id, str) for r in got)
                outcomes.add("read")
        return "error" if "error" in outcomes else "read"

    not_utf8 = ("random", b"\x0a\x01\xff\x12\x00")  # scenario_id b"\xff" and one empty joint scene
    fuzz(capsys, "rollouts readers (metrics.rollouts_io / evaluation.submission read_rollouts, binproto)",
         mutations(submission_bytes, boundaries), check, budget=300, extra_cases=[not_utf8])


def test_submission_archive_reader(tmp_path, submission_bytes, capsys):
    tar = _tar({"submission.binproto-00000-of-00001": submission_bytes})
    tgz = gzip.compress(tar, compresslevel=1, mtime=0)
    path = tmp_path / "case.tar.gz"
    path.write_bytes(tgz)
    original = submission.read_rollouts(path)
    assert [r.scenario_id for r in original] == [SCENARIO_ID]  # valid input reads as before
    blocks = list(range(0, len(tar) + 1, 512))

    def check(case) -> str:
        layer, mutation = case
        # "gz": the archive's bytes; "tar": the tar inside a valid gzip stream.
        path.write_bytes(mutate(tgz, mutation) if layer == "gz"
                         else gzip.compress(mutate(tar, mutation), compresslevel=1, mtime=0))
        try:
            got = submission.read_rollouts(path)
        except ValueError as e:
            assert_clean(e, path, ValueError)
            return "error"
        assert all(isinstance(r.scenario_id, str) for r in got)
        if layer == "gz" and mutation[0] == "flip":  # gzip's CRC covers the data: only header flips read
            same = got == original  # a bool: pytest's diff of two 2 MB protos takes longer than a case
            assert same, "a flipped bit in the archive read as other rollouts"
        return "read"

    strategy = st.one_of(st.tuples(st.just("gz"), mutations(tgz, [10, len(tgz) - 8], header=10)),
                         st.tuples(st.just("tar"), mutations(tar, blocks, header=512)))
    fuzz(capsys, "submission archive reader (evaluation.submission.read_rollouts, tar.gz)", strategy, check,
         budget=200)


def test_checkpoint_loader(tmp_path, checkpoint, capsys):
    source, data, weights = checkpoint
    with zipfile.ZipFile(source) as archive:  # records, the central directory, its end record
        boundaries = [i.header_offset for i in archive.infolist()] + [archive.start_dir, data.rfind(b"PK\x05\x06")]
    loaded = load_checkpoint(source)  # valid input loads as before
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights.items())
    assert checkpoint_extra(source) == {"stage": "bc", "epoch": 3}
    path = tmp_path / "case.pt"

    def check(case) -> str:
        path.write_bytes(mutate(data, case))
        try:
            model = load_checkpoint(path)
        except ValueError as e:
            assert_clean(e, path, ValueError)
            outcome = "error"
        else:  # only when the damage missed everything that matters: the same weights
            state = model.state_dict()
            assert all(torch.equal(state[k], v) for k, v in weights.items())
            outcome = "read"
        try:
            checkpoint_extra(path)
        except ValueError as e:
            assert_clean(e, path, ValueError)
            outcome = "error"
        return outcome

    fuzz(capsys, "checkpoint loader (load_checkpoint, checkpoint_extra)", mutations(data, boundaries, header=128),
         check, budget=400)


def test_checkpoint_loader_on_wrong_contents(tmp_path, checkpoint, capsys):
    """Valid zip files that torch.load reads, with the right format tag and wrong contents."""
    source, _, _ = checkpoint
    blob = torch.load(source, weights_only=True)
    path = tmp_path / "case.pt"
    junk = st.one_of(st.none(), st.booleans(), st.integers(-2**31, 2**31), st.floats(), st.text(max_size=8),
                     st.lists(st.integers(-3, 3), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
                     st.sampled_from([torch.zeros(0), torch.zeros(2, 3), torch.full((NUM_TYPES, 64, SHIFT, 3), float("nan"))]))
    # Config sizes stay small: the loader builds the model its config describes before it compares
    # the weights, so a crafted config with huge sizes would allocate them (bit flips cannot get
    # there: the zip records' CRCs are checked first).
    small = st.one_of(st.integers(-2, 80), st.floats(-2, 80), st.text(max_size=3), st.none())
    changes = st.one_of(
        st.tuples(st.just("drop"), st.sampled_from(sorted(blob))),
        st.tuples(st.just("set"), st.sampled_from(sorted(blob)), junk),
        st.tuples(st.just("config"), st.sampled_from(sorted(blob["model_config"])), small),
        st.tuples(st.just("vocab"), st.sampled_from(["contours", "shift"]), junk),
        st.tuples(st.just("weight"), st.sampled_from(sorted(blob["state_dict"])), junk),
        st.tuples(st.just("whole"), junk),
    )

    def check(change) -> str:
        what, *args = change
        case = {**blob, "model_config": dict(blob["model_config"]), "vocab": dict(blob["vocab"]),
                "state_dict": dict(blob["state_dict"])}
        if what == "drop":
            del case[args[0]]
        elif what == "set":
            case[args[0]] = args[1]
        elif what in ("config", "vocab", "weight"):
            case[{"config": "model_config", "vocab": "vocab", "weight": "state_dict"}[what]][args[0]] = args[1]
        else:
            case = args[0]
        torch.save(case, path)
        outcome = "read"
        for read in (load_checkpoint, checkpoint_extra):
            try:
                read(path)
            except ValueError as e:
                assert_clean(e, path, ValueError)
                outcome = "error"
        return outcome

    fuzz(capsys, "checkpoint loader on wrong contents", changes, check, budget=80)


# --- the command line -----------------------------------------------------------------------------

def test_cli_turns_corrupt_inputs_into_exit_status_2(tmp_path, womd_path, submission_bytes, checkpoint, capsys):
    from smart_r1.cli import main

    rollouts = tmp_path / "rollouts.binproto"
    rollouts.write_bytes(submission_bytes)
    scenario = tmp_path / "scenario.tfrecord"
    scenario.write_bytes(mutate(womd_path.read_bytes(), ("flip", (8 * 500_000 + 3,))))
    bad_rollouts = tmp_path / "bad.binproto"
    bad_rollouts.write_bytes(submission_bytes[: len(submission_bytes) // 2 + 1])
    bad_archive = tmp_path / "bad.tar.gz"
    bad_archive.write_bytes(mutate(gzip.compress(_tar({"submission.binproto-00000-of-00001": submission_bytes}),
                                                 compresslevel=1, mtime=0), ("flip", (8 * 100_000,))))
    bad_checkpoint = tmp_path / "bad.pt"
    bad_checkpoint.write_bytes(mutate(checkpoint[1], ("flip", (8 * 200_000 + 5,))))
    runs = {
        scenario: ["metrics", "--scenario", str(scenario), "--rollouts", str(rollouts)],
        bad_rollouts: ["metrics", "--scenario", str(womd_path), "--rollouts", str(bad_rollouts)],
        bad_archive: ["render", "--scenario", str(womd_path), "--rollouts", str(bad_archive),
                      "--out", str(tmp_path / "r.png")],
        bad_checkpoint: ["rollout", "--checkpoint", str(bad_checkpoint), "--scenario", str(womd_path),
                         "--out", str(tmp_path / "out.binproto")],
    }
    for bad, argv in runs.items():
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"smart-r1 {argv[0]}: error: ") and err.count("\n") == 1, err
        assert str(bad) in err, err
        assert bad != scenario or f"{scenario}: record 0: bad data CRC" in err, err
    assert not (tmp_path / "r.png").exists() and not (tmp_path / "out.binproto").exists()
