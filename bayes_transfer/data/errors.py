"""Errors raised by the data package (all subclasses of `BayesTransferError`)."""

from bayes_transfer.errors import BayesTransferError


class DatasetNotFoundError(BayesTransferError, FileNotFoundError):
    """A dataset could not be found in any of the places we look for it.

    The message lists each place tried and how to make the data available.
    """


class UnknownDatasetError(DatasetNotFoundError, ValueError):
    """The dataset name is not one we know; the message lists the known names."""


class DatasetFormatError(BayesTransferError, ValueError):
    """Source files exist but are corrupt or laid out differently than expected."""


class DataOptionError(BayesTransferError, ValueError):
    """A data option does not fit the dataset: more shots than a class has, a class it
    does not have, a negative count. The message names the class and the numbers."""
