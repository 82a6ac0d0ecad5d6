"""The teacher cache as stages see it: setting a store up, teacher outputs as rows, top-k tails, statistics, integrity and reports."""
