"""The "intent" task: household-appliance commands to a JSON intent (like the ESFT paper's BDCI intent task).

    Command: please set the oven to 180 degrees
    JSON: {"device": "oven", "action": "set_temperature", "value": 180}

Every intent has the same three keys; `value` is a number, a string (a mode or colour) or null (on/off).
Devices have several names ("TV", "television") and commands several phrasings, so the model must normalise, not
copy. Score: exact match of the parsed JSON (invalid JSON scores 0); secondary: field-level accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moeserve.demo.tasks.base import StableRng, Task, mean, record
from moeserve.demo.tasks.metrics import field_accuracy, parse_json_object


@dataclass(frozen=True)
class Setting:
    """One adjustable setting of a device: the action it maps to and the values a command can carry."""

    action: str  # e.g. "set_temperature"
    values: tuple[int | str, ...]  # what the command may ask for
    phrasings: tuple[str, ...]  # templates with {device} and {value}


@dataclass(frozen=True)
class Device:
    key: str  # the JSON value, e.g. "air_conditioner"
    names: tuple[str, ...]  # how people call it
    settings: tuple[Setting, ...]
    can_switch: bool = True  # has turn_on / turn_off


def _temp(values: range, unit: str = "degrees") -> Setting:
    return Setting("set_temperature", tuple(values), (
        "set the {device} to {value} " + unit,
        "change the {device} temperature to {value} " + unit,
        "make the {device} {value} " + unit,
    ))  # fmt: skip


def _timer() -> Setting:
    return Setting("set_timer", tuple(range(5, 95, 5)), (
        "set a timer of {value} minutes on the {device}",
        "run the {device} for {value} minutes",
    ))  # fmt: skip


def _mode(*modes: str) -> Setting:
    return Setting("set_mode", modes, (
        "switch the {device} to {value} mode",
        "put the {device} on {value} mode",
        "use {value} mode on the {device}",
    ))  # fmt: skip


DEVICES: tuple[Device, ...] = (
    Device("oven", ("oven",), (_temp(range(150, 260, 10)), _timer())),
    Device("air_conditioner", ("air conditioner", "AC"), (_temp(range(16, 31)), _mode("cool", "heat", "dry", "fan"))),
    Device("washing_machine", ("washing machine", "washer"), (_mode("cotton", "wool", "quick", "eco"), _timer())),
    Device("lights", ("lights", "lamp"), (
        Setting("set_brightness", tuple(range(10, 110, 10)), (
            "set the {device} brightness to {value} percent",
            "dim the {device} to {value} percent",
        )),
        Setting("set_color", ("red", "blue", "green", "warm", "white"), (
            "make the {device} {value}",
            "change the {device} color to {value}",
        )),
    )),
    Device("tv", ("TV", "television"), (
        Setting("set_volume", tuple(range(0, 51)), (
            "set the {device} volume to {value}",
            "turn the {device} volume to {value}",
        )),
        Setting("set_channel", tuple(range(1, 100)), (
            "switch the {device} to channel {value}",
            "put channel {value} on the {device}",
        )),
    )),
    Device("fan", ("fan",), (
        Setting("set_speed", tuple(range(1, 6)), (
            "set the {device} to speed {value}",
            "run the {device} at speed {value}",
        )),
    )),
    Device("fridge", ("fridge", "refrigerator"), (_temp(range(1, 9)),), can_switch=False),
    Device("heater", ("heater",), (_temp(range(15, 29)),)),
    Device("dishwasher", ("dishwasher",), (_mode("eco", "intensive", "quick"), _timer())),
    Device("robot_vacuum", ("robot vacuum", "vacuum"), (_mode("quiet", "normal", "turbo"),)),
)  # fmt: skip

# The built-in base is pretrained on commands for these devices only; the others are left for an intent adapter.
BASE_DEVICES: tuple[str, ...] = ("oven", "air_conditioner", "lights", "tv", "fan")

_ON = ("turn on the {device}", "switch on the {device}", "start the {device}")
_OFF = ("turn off the {device}", "switch off the {device}", "stop the {device}")
_PREFIXES = ("", "", "please ", "could you ", "can you ", "hey, ")
_SUFFIXES = ("", "", " please", " now", " for me")


def intent_json(device: str, action: str, value: int | str | None) -> str:
    """The canonical completion text; key order and spacing are fixed so exact string match is also meaningful."""
    return json.dumps({"device": device, "action": action, "value": value})


def intent_schema() -> dict[str, Any]:
    """The JSON schema of an intent, for structured outputs: the task's devices and actions, values in their ranges."""
    settings = [s for d in DEVICES for s in d.settings]
    ints = [v for s in settings for v in s.values if isinstance(v, int)]
    return {
        "type": "object",
        "properties": {
            "device": {"enum": [d.key for d in DEVICES]},
            "action": {"enum": sorted({s.action for s in settings} | {"turn_on", "turn_off"})},
            "value": {
                "anyOf": [
                    {"type": "integer", "minimum": min(ints), "maximum": max(ints)},
                    {"enum": sorted({v for s in settings for v in s.values if isinstance(v, str)})},
                    {"type": "null"},
                ]
            },
        },
        "required": ["device", "action", "value"],
        "additionalProperties": False,
    }


class IntentTask(Task):
    name = "intent"
    description = "household-appliance commands to a JSON intent {device, action, value}"
    metric = "exact match of the parsed JSON object (invalid JSON scores 0)"
    max_new_tokens = 40

    def _draw(self, rng: StableRng) -> dict[str, Any]:
        device = rng.choice(DEVICES)
        name = rng.choice(device.names)
        n_choices = len(device.settings) + (2 if device.can_switch else 0)
        pick = rng.below(n_choices)
        if pick < len(device.settings):
            setting = device.settings[pick]
            value = rng.choice(setting.values)
            text = rng.choice(setting.phrasings).format(device=name, value=value)
            action = setting.action
        else:
            action = "turn_on" if pick == len(device.settings) else "turn_off"
            text = rng.choice(_ON if action == "turn_on" else _OFF).format(device=name)
            value = None
        command = rng.choice(_PREFIXES) + text + rng.choice(_SUFFIXES)
        return record(f"Command: {command}\nJSON:", " " + intent_json(device.key, action, value))

    def pretraining_examples(self, n: int, seed: int) -> list[dict[str, Any]]:
        """Train examples for BASE_DEVICES only: the base knows the JSON format and half the appliances."""
        records = self.generate("train", 4 * n, seed)
        return [r for r in records if json.loads(r["completion"])["device"] in BASE_DEVICES][:n]

    def _score(self, prediction: str, reference: str) -> float:
        pred, ref = parse_json_object(prediction), parse_json_object(reference)
        if ref is None:
            raise ValueError(f"the reference is not a JSON object: {reference!r}")
        return float(pred is not None and field_accuracy(pred, ref) == 1.0)

    def _secondary(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        parsed = [parse_json_object(p) for p in predictions]
        fields = [field_accuracy(p, parse_json_object(r) or {}) for p, r in zip(parsed, references)]
        return {"field_accuracy": mean(fields), "valid_json": mean([float(p is not None) for p in parsed])}
