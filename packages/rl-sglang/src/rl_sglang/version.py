"""The SGLang release whose routes and request fields this package was checked against."""

SGLANG_VERSION_CODED_AGAINST = "0.5.23"
