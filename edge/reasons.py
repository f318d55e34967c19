"""Reason codes: why a touch was allowed or denied. Stable strings, part of touch schema v1."""

from enum import StrEnum


class Reason(StrEnum):
    OK = "ok"                            # allowed
    UNKNOWN_CARD = "unknown_card"        # card identifier not in the ID list
    UNKNOWN_TECHNICIAN = "unknown_technician"  # ID read from the card, not in the list
    SUSPENDED = "suspended"
    REVOKED = "revoked"
    UNREADABLE = "unreadable"            # the card answered, its data could not be read
    BAD_CARD_DATA = "bad_card_data"      # read, but not a technician ID in the profile's format
    FOREIGN_CARD = "foreign_card"        # another system's card (transit, My Number, ...)
    NO_LIST = "no_list"                  # the device has no ID list to decide with
    LIMIT_REACHED = "limit_reached"      # vending: allowance for the period used up
    ANTI_PASSBACK = "anti_passback"      # gate: same direction twice
    REGISTERED = "registered"            # training: counted, technician known
    UNREGISTERED = "unregistered"        # training: counted, technician not in the list
