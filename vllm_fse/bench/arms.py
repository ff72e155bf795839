"""The arms of every A/B here: an FSE-off and an FSE-on OpenAI server on the same model, and
for the sweep optionally a third, ``auto`` (``VLLM_FSE=auto``: fused or split per step).

An arm is an environment on top of the same server arguments. Before an arm is measured, its
server log must show that every model in it really runs as the arm says (the plugin logs one
plan line per model); a silent fallback would turn the comparison into off vs off.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from vllm_fse.server import OpenAIServer

ARM_NAMES = ("off", "on")  # the default pair; accuracy and profile always compare these
ALL_ARMS = ("off", "on", "auto")
ARM_ENV = {"off": {"VLLM_FSE": "0"}, "on": {"VLLM_FSE": "1"}, "auto": {"VLLM_FSE": "auto"}}
ARM_LABEL = {"off": "FSE=0", "on": "FSE=1", "auto": "auto"}
SERVED_MODEL_NAME = "fse-bench"

_PLAN_LINE = re.compile(r"vllm-fse: (\w+) FSE (on|off) \(")


def parse_env(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def add_model_arguments(parser: argparse.ArgumentParser, preset: str) -> None:
    """The model both arms run: a path or name, else an embedded tiny-model preset."""
    parser.add_argument("--model", default=None, help="model path or name (default: the embedded --preset)")
    parser.add_argument("--preset", default=preset,
                        help=f"embedded tiny-model preset when --model is not given (default: {preset})")
    parser.add_argument("--dtype", default=None,
                        help="--dtype of the model (default: the embedded preset's own dtype, else vLLM's auto; "
                             "note that auto runs float32 checkpoints in bfloat16)")


def resolve_model(model: str | None, preset: str, dtype: str | None) -> tuple[str, str | None]:
    """The model to serve and its ``--dtype``: a given model keeps vLLM's choice unless told;
    the embedded preset runs in its own dtype (vLLM's auto would run float32 as bfloat16)."""
    if model:
        return model, dtype
    from vllm_fse.demo import cached_model
    from vllm_fse.tiny_model import PRESETS

    return str(cached_model(preset)), dtype or PRESETS[preset].dtype


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Server arguments and environments of the two arms, and how their servers are run."""
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra server argument for both arms, e.g. --server-arg=--tensor-parallel-size=2 "
                             "(repeat for several; JSON values as --server-arg=--speculative-config={...})")
    parser.add_argument("--env", type=parse_env, action="append", default=[], metavar="KEY=VALUE",
                        help="environment of both servers")
    parser.add_argument("--env-off", type=parse_env, action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the FSE-off server only")
    parser.add_argument("--env-on", type=parse_env, action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the FSE-on server only, e.g. VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS=1")
    parser.add_argument("--servers", choices=("both", "alternate", "auto"), default="auto",
                        help="both arms up at once, or one at a time (auto: both on CPU, alternate with a GPU)")
    parser.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds per server start")


def server_mode(choice: str) -> str:
    """``auto``: both servers at once on CPU; one at a time where a GPU is visible."""
    if choice != "auto":
        return choice
    from vllm_fse.bench.machine import has_accelerator

    return "alternate" if has_accelerator() else "both"


def arm_order(index: int, arms: Sequence[str] = ARM_NAMES) -> tuple[str, ...]:
    """Rotate which arm goes first so that none always runs on the warmer machine (two arms:
    alternate)."""
    arms = tuple(arms)
    k = index % len(arms)
    return arms[k:] + arms[:k]


def arm_environments(
    both: Mapping[str, str],
    off: Mapping[str, str],
    on: Mapping[str, str],
    auto: Mapping[str, str] | None = None,
    arms: Sequence[str] = ARM_NAMES,
) -> dict[str, dict[str, str]]:
    """``VLLM_FSE`` per arm, then the environment for all arms, then each arm's own."""
    extra = {"off": off, "on": on, "auto": auto or {}}
    return {arm: {**ARM_ENV[arm], **both, **extra[arm]} for arm in arms}


def fse_states(log_text: str) -> dict[str, str]:
    """``{model class: "on"|"off"}`` from the plugin's one-line plan per model in a server log."""
    return {m.group(1): m.group(2) for m in _PLAN_LINE.finditer(log_text)}


def check_arm(arm: str, log_text: str, log_path: Path) -> dict[str, str]:
    """The server really runs the arm it stands for. ``off``: no model says FSE on (with FSE not
    asked for the plugin registers nothing and logs no plan line: vLLM's own classes). ``on``:
    every model says FSE on. ``auto``: FSE on, with the per-step switch."""
    states = fse_states(log_text)
    if arm == "off":
        on = {name: state for name, state in states.items() if state != "off"}
        if on:
            raise RuntimeError(f"arm 'off': the server runs with FSE {on} (see {log_path})")
        return states
    if arm == "auto" and states:
        not_auto = [ln for ln in log_text.splitlines() if " FSE on (" in ln and "; auto: " not in ln]
        if not_auto:
            raise RuntimeError(f"arm 'auto': a model runs FSE on without the per-step switch (see {log_path})")
        arm = "on"
    if not states:
        raise RuntimeError(
            f"arm {arm!r}: the server log {log_path} has no vllm-fse plan line; is the model one of the "
            "supported families and vllm-fse installed in the server's environment?"
        )
    wrong = {name: state for name, state in states.items() if state != arm}
    if wrong:
        raise RuntimeError(
            f"arm {arm!r}: the server runs with FSE {wrong} (see {log_path}); a fallback makes "
            "the comparison meaningless. The plugin's warning in the log says why."
        )
    return states


class ArmServers:
    """Starts, checks and stops the arms' servers as a schedule needs them."""

    def __init__(
        self,
        model: str,
        server_args: Sequence[str],
        arm_env: Mapping[str, Mapping[str, str]],
        log_dir: Path,
        startup_timeout_s: float = 1800.0,
    ) -> None:
        self.model = model
        self.server_args = list(server_args)
        self.arm_env = arm_env
        self.log_dir = log_dir
        self.startup_timeout_s = startup_timeout_s
        self.running: dict[str, OpenAIServer] = {}
        self.info: dict[str, dict] = {}
        self.starts = 0

    def _new(self, arm: str) -> OpenAIServer:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"server-{arm}-{self.starts}.log"
        self.starts += 1
        return OpenAIServer(
            self.model,
            self.server_args,
            env=self.arm_env[arm],
            log_path=log_path,
            startup_timeout_s=self.startup_timeout_s,
            served_model_name=SERVED_MODEL_NAME,
        )

    def ensure(self, arms: Sequence[str]) -> None:
        """Exactly ``arms`` running; new ones start together, so that their start-ups overlap."""
        for arm in [a for a in self.running if a not in arms]:
            self.running.pop(arm).stop()
        new = {arm: self._new(arm) for arm in arms if arm not in self.running}
        for arm, server in new.items():
            env = " ".join(f"{k}={v}" for k, v in self.arm_env[arm].items())
            print(f"[{arm}] starting the server ({env}); log {server.log_path}", flush=True)
            server.launch()
        try:
            for arm, server in new.items():
                self.running[arm] = server
                server.wait_healthy()
                log = server.log_path.read_text(errors="replace")
                states = check_arm(arm, log, server.log_path)
                self.info[arm] = {
                    "startup_s": round(server.startup_s, 1),
                    "fse": states,
                    "plan": [ln.split("vllm-fse: ", 1)[1] for ln in log.splitlines() if "vllm-fse: " in ln],
                    "command": server.command(),
                    "env": dict(self.arm_env[arm]),
                }
                said = states or "off (vLLM's own classes)"
                print(f"[{arm}] healthy after {server.startup_s:.0f}s; FSE {said}", flush=True)
        except BaseException:
            for server in new.values():
                server.stop()
            raise

    def url(self, arm: str) -> str:
        return self.running[arm].base_url

    def stop_all(self) -> None:
        for server in self.running.values():
            server.stop()
        self.running.clear()

    def __enter__(self) -> ArmServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
