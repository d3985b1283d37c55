"""The ActiveCampaign tags the native Dynamics 365 integration uses, and the tag sets they form."""

from __future__ import annotations

from enum import StrEnum


class Tag(StrEnum):
    """The exact tag strings of the native integration."""

    LEAD = "D365: Lead"
    CONTACT = "D365: Contact"
    PULLED_FROM_AC = "D365: Pulled from ActiveCampaign"
    PUSHED_FROM_DYNAMICS = "D365: Pushed from Dynamics"


# Put on an AC contact whose Dynamics record was deleted (`on_delete: tag`), in place of its
# type tag. Not one of the native integration's tags, so not in `ALL_TAGS`.
DELETED_IN_DYNAMICS = "D365: Deleted in Dynamics"

TYPE_TAGS = (Tag.LEAD, Tag.CONTACT)
ORIGIN_TAGS = (Tag.PULLED_FROM_AC, Tag.PUSHED_FROM_DYNAMICS)
ALL_TAGS = TYPE_TAGS + ORIGIN_TAGS
