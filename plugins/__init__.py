"""carve.plugins: the policy (criteria, allocators, repairs, passes), each registered by name; see
docs/architecture.md."""
