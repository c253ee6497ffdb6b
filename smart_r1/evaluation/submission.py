"""WOSAC 2025 leaderboard submissions: `SimAgentsChallengeSubmission` shards in a tar.gz.

The server takes a tar.gz of files named `submission.binproto-00000-of-0000N`, each a serialized
`SimAgentsChallengeSubmission` carrying a slice of the scenarios' `ScenarioRollouts` plus the same
method metadata (account, method name, authors, ... and the closed-loop acknowledgement). Every
`ScenarioRollouts` is checked against its scenario with the official rules
(`waymo_open_dataset.utils.sim_agents.submission_specs.validate_scenario_rollouts`: exactly 32
joint scenes, every sim agent once, no other object, 80 steps per field) and for finite values,
which the official rules do not check but the server's metrics cannot score.

Shards are written as scenarios arrive (a test-set export does not fit in memory) under temporary
names, renamed to `-of-N` once N is known, then packed.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from waymo_open_dataset.protos import scenario_pb2
from waymo_open_dataset.protos import sim_agents_submission_pb2 as submission_pb2
from waymo_open_dataset.utils.sim_agents import submission_specs

from smart_r1.data.womd import scenario_to_proto
from smart_r1.metrics.rollouts_io import scenario_rollouts_to_states
from smart_r1.storage import write_bytes
from smart_r1.types import ScenarioRecord

SHARD_PREFIX = "submission.binproto"
ARCHIVE_NAME = "submission.tar.gz"
# ~2-3 MB per scenario with 32 rollouts: 100 scenarios keep each shard a few hundred MB.
DEFAULT_SCENARIOS_PER_SHARD = 100


@dataclass(frozen=True)
class SubmissionInfo:
    """The method metadata every shard carries (the proto's fields of the same names).

    account_name: the Waymo Open Dataset account (e-mail) that uploads the file
    unique_method_name: the method's name on the leaderboard
    num_model_parameters: a string, e.g. "7M", as the form asks
    acknowledge_complies_with_closed_loop_requirement: the 2025 rule that agents are simulated in
        closed loop (each step conditioned on the simulated past); must be True to be scored
    """

    account_name: str
    unique_method_name: str
    authors: tuple[str, ...] = ()
    affiliation: str = ""
    description: str = ""
    method_link: str = ""
    uses_lidar_data: bool = False
    uses_camera_data: bool = False
    uses_public_model_pretraining: bool = False
    public_model_names: tuple[str, ...] = ()
    num_model_parameters: str = ""
    acknowledge_complies_with_closed_loop_requirement: bool = True

    def validate(self) -> "SubmissionInfo":
        if not self.account_name.strip():
            raise ValueError("submission needs an account name (the Waymo Open Dataset account e-mail)")
        if not self.unique_method_name.strip():
            raise ValueError("submission needs a method name")
        if not self.acknowledge_complies_with_closed_loop_requirement:
            raise ValueError("WOSAC 2025 only scores submissions that acknowledge the closed-loop requirement")
        if self.uses_public_model_pretraining and not self.public_model_names:
            raise ValueError("uses_public_model_pretraining is set: name the public models")
        return self

    def to_proto(self) -> submission_pb2.SimAgentsChallengeSubmission:
        """A submission with this metadata and no scenario yet."""
        return submission_pb2.SimAgentsChallengeSubmission(
            submission_type=submission_pb2.SimAgentsChallengeSubmission.SIM_AGENTS_SUBMISSION,
            account_name=self.account_name, unique_method_name=self.unique_method_name,
            authors=list(self.authors), affiliation=self.affiliation, description=self.description,
            method_link=self.method_link, uses_lidar_data=self.uses_lidar_data,
            uses_camera_data=self.uses_camera_data,
            uses_public_model_pretraining=self.uses_public_model_pretraining,
            public_model_names=list(self.public_model_names),
            num_model_parameters=self.num_model_parameters,
            acknowledge_complies_with_closed_loop_requirement=(
                self.acknowledge_complies_with_closed_loop_requirement),
        )


def validate_rollouts(scenario: ScenarioRecord | scenario_pb2.Scenario,
                      rollouts: submission_pb2.ScenarioRollouts) -> None:
    """Raise ValueError, naming the scenario, unless `rollouts` is a valid WOSAC entry for it."""
    proto = scenario if isinstance(scenario, scenario_pb2.Scenario) else scenario_to_proto(scenario)
    if rollouts.scenario_id != proto.scenario_id:
        raise ValueError(f"rollouts are for scenario {rollouts.scenario_id!r}, "
                         f"not for scenario {proto.scenario_id!r}")
    try:
        submission_specs.validate_scenario_rollouts(rollouts, proto)
    except ValueError as e:
        raise ValueError(f"scenario {proto.scenario_id}: {e}") from None
    if isinstance(scenario, ScenarioRecord):
        scenario_rollouts_to_states(scenario, rollouts)  # finite values (ValueError otherwise)
    else:
        from smart_r1.data.womd import scenario_from_proto

        scenario_rollouts_to_states(scenario_from_proto(proto), rollouts)


@dataclass
class SubmissionWriter:
    """Validates and writes `ScenarioRollouts` into submission shards, then packs them.

    Use as a context manager, or call `close()`; `close()` returns the tar.gz path.
        with SubmissionWriter(out_dir, info) as writer:
            for record, rollouts in ...: writer.add(record, rollouts)
        writer.archive  # out_dir / "submission.tar.gz"
    """

    out_dir: Path
    info: SubmissionInfo
    scenarios_per_shard: int = DEFAULT_SCENARIOS_PER_SHARD
    archive: Path | None = None
    _pending: list[submission_pb2.ScenarioRollouts] = field(default_factory=list)
    _parts: list[Path] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.info.validate()
        if self.scenarios_per_shard < 1:
            raise ValueError("scenarios_per_shard must be at least 1")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stale = sorted(self.out_dir.glob(f"{SHARD_PREFIX}-*"))
        if stale:
            raise ValueError(f"{self.out_dir} already holds submission shards ({stale[0].name}, ...): "
                                  "use an empty folder, so that no old shard ends up in the archive")

    def add(self, scenario: ScenarioRecord | scenario_pb2.Scenario,
            rollouts: submission_pb2.ScenarioRollouts) -> None:
        """Validate one scenario's rollouts and queue them (a shard is written when full)."""
        validate_rollouts(scenario, rollouts)
        if rollouts.scenario_id in self._seen:
            raise ValueError(f"scenario {rollouts.scenario_id} was already added to the submission")
        self._seen.add(rollouts.scenario_id)
        self._pending.append(rollouts)
        if len(self._pending) >= self.scenarios_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        shard = self.info.to_proto()
        shard.scenario_rollouts.extend(self._pending)
        path = self.out_dir / f"{SHARD_PREFIX}-{len(self._parts):05d}.partial"
        write_bytes(path, shard.SerializeToString())
        self._parts.append(path)
        self._pending = []

    def close(self) -> Path:
        """Write the last shard, name all shards `-NNNNN-of-NNNNN`, pack them; the archive path."""
        if self.archive is not None:
            return self.archive
        self._flush()
        if not self._parts:
            raise ValueError("the submission holds no scenario")
        total = len(self._parts)
        shards = []
        for i, part in enumerate(self._parts):
            shards.append(part.rename(self.out_dir / f"{SHARD_PREFIX}-{i:05d}-of-{total:05d}"))
        archive = self.out_dir / ARCHIVE_NAME
        packed = io.BytesIO()
        with tarfile.open(fileobj=packed, mode="w:gz") as tar:
            for shard in shards:
                tar.add(shard, arcname=shard.name)  # the server expects the shards at the root
        write_bytes(archive, packed.getvalue())  # atomically: an archive on disk is a whole one
        self.archive = archive
        return archive

    def __enter__(self) -> "SubmissionWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    @property
    def num_scenarios(self) -> int:
        return len(self._seen)


def _parse_submission(data: bytes) -> submission_pb2.SimAgentsChallengeSubmission | None:
    from google.protobuf.message import DecodeError

    try:
        proto = submission_pb2.SimAgentsChallengeSubmission.FromString(data)
    except DecodeError:
        return None
    if proto.scenario_rollouts and all(r.joint_scenes for r in proto.scenario_rollouts):
        return proto
    return None


def read_rollouts(path: str | Path) -> list[submission_pb2.ScenarioRollouts]:
    """Every `ScenarioRollouts` in a file: a `ScenarioRollouts` or `SimAgentsChallengeSubmission`
    binproto (a shard included), or a submission tar.gz of shards."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rollouts file {path} does not exist")
    if path.name.endswith((".tar.gz", ".tgz")):
        out = []
        try:
            with tarfile.open(path, "r:gz") as tar:
                for member in sorted(tar.getmembers(), key=lambda m: m.name):
                    if member.isfile():
                        out += read_rollouts_bytes(tar.extractfile(member).read(), f"{path}:{member.name}")
                # tarfile stops at the end-of-archive blocks, before the gzip trailer: read on to it,
                # so that gzip checks its CRC32 (a flipped bit in a shard would go unnoticed).
                while tar.fileobj.read(1 << 20):
                    pass
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:  # damaged or not a gzip tar
            raise ValueError(f"{path} is not a readable submission archive: {e}") from e
        return out
    return read_rollouts_bytes(path.read_bytes(), str(path))


def read_rollouts_bytes(data: bytes, name: str = "rollouts") -> list[submission_pb2.ScenarioRollouts]:
    """Parse a `SimAgentsChallengeSubmission` or a `ScenarioRollouts` (both start with a
    length-delimited field 1, so the one whose content makes sense wins)."""
    from google.protobuf.message import DecodeError

    submission = _parse_submission(data)
    if submission is not None:
        return _utf8_ids(list(submission.scenario_rollouts), name)
    try:
        rollouts = submission_pb2.ScenarioRollouts.FromString(data)
    except DecodeError:
        rollouts = None
    if rollouts is None or not rollouts.joint_scenes:
        raise ValueError(f"{name} is neither a SimAgentsChallengeSubmission nor a ScenarioRollouts "
                         "binproto with joint scenes")
    return _utf8_ids([rollouts], name)


def _utf8_ids(rollouts: list[submission_pb2.ScenarioRollouts], name: str) -> list[submission_pb2.ScenarioRollouts]:
    """`rollouts`, unless a scenario id is not UTF-8 (proto2 hands such a string back as bytes)."""
    for i, r in enumerate(rollouts):
        if not isinstance(r.scenario_id, str):
            raise ValueError(f"{name}: scenario_rollouts {i}: scenario_id {r.scenario_id[:40]!r} is not UTF-8")
    return rollouts
