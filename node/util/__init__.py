"""Helpers with no role of their own (atomic files, exception groups, the allocator). They import
nothing else of node/."""
