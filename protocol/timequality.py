"""Time quality: how far a device's clock can be trusted. Part of touch schema v1 (`tq`)."""

from enum import StrEnum


class TimeQuality(StrEnum):
    NEVER_SYNCED = "never_synced"  # the device has never had a trustworthy time source
    SYNCED = "synced"
    DRIFTED = "drifted"            # was synced, but too long ago or a jump was seen
