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
    NOT_ACTUATED = "not_actuated"        # gate: allowed, but the board is offline: nothing opened
    EMERGENCY_OPEN = "emergency_open"    # gate: allowed while the emergency release holds it open
    REGISTERED = "registered"            # training: counted, technician known
    UNREGISTERED = "unregistered"        # training: counted, technician not in the list
    # card reading (edge/reader): each bad input has its own code; docs/readers.md lists them
    TRUNCATED_READ = "truncated_read"    # the card sent fewer bytes than the profile reads
    WRONG_SERVICE = "wrong_service"      # FeliCa: the card has no such service (or no access)
    WRONG_TECHNOLOGY = "wrong_technology"  # e.g. an ISO 14443 card on a FeliCa profile
    FOREIGN_APPLICATION = "foreign_application"  # ISO-DEP: the AID is not on the card (My Number, ...)
    FILE_NOT_FOUND = "file_not_found"    # ISO-DEP: the application has no such file
    ACCESS_DENIED = "access_denied"      # ISO-DEP: security status not satisfied (PIN, key)
    BAD_RESPONSE = "bad_response"        # a malformed or unexpected FeliCa frame or APDU response
