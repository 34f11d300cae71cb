-- The types of subscriptions.tier and .status as SQL type names (schema-qualified and quoted
-- where needed), for the casts of insert_host.sql. `subscriptions` is found as every query of
-- the job finds it: through the search_path (a table or a view).
SELECT a.attname::text, format_type(a.atttypid, NULL)
FROM pg_attribute a
WHERE a.attrelid = 'subscriptions'::regclass AND a.attname IN ('tier', 'status')
  AND a.attnum > 0 AND NOT a.attisdropped
