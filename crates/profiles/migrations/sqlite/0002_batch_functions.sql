-- PostgreSQL's migration 0002 adds server-side functions for BatchResolve and ApplyAggregates.
-- SQLite keeps the store's generic statements, so it has nothing to add; this file keeps the
-- two engines' migration numbers in step.
SELECT 1;
