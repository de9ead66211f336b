"""The command line (:mod:`.cli`): ``bidiattn verify`` (:mod:`.verify`) and ``bidiattn masks``
(token layouts :mod:`.layouts`, convention comparisons :mod:`.compare`, pictures :mod:`.plot`)."""
