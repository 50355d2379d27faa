"""The one exception type users see.

Every failure a user can fix (a bad config field, a corrupt input file, an output directory that
belongs to another merge) is raised as `DistSvcError` with a message that names the file, tensor
or field and says what to do. The CLI prints it without a traceback; anything else is a bug.
"""


class DistSvcError(Exception):
    pass
