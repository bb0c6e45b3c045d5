-- MLflow keeps its tracking and registry tables in a database of its own: both it and the control plane
-- use Alembic, and one `alembic_version` table cannot serve two schemas.
CREATE DATABASE mlflow;
