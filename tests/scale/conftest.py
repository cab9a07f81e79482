"""What a call costs as a tenant's history grows (rows read, bounded by the page or the rows due,
never by history): the use cases over the in-memory store, as in tests/service, seeded with large
histories. Apart from tests/service so that `make test-fast` stays quick; `make test` runs them."""

from tests.service.conftest import clock, keys, make_policy, make_policy_on, service, shared_ca, store, user_key  # noqa: F401
