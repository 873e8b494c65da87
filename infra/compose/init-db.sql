-- docker compose -f infra/compose/compose.yaml up -d --build   (runs this file once)
-- Mounted into postgres's /docker-entrypoint-initdb.d: executed only when the data volume is
-- empty (first start), as POSTGRES_USER, who therefore owns both databases.
-- To re-run it: docker compose -f infra/compose/compose.yaml down -v  (deletes all data).
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
