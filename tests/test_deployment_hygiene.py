

def test_a_cluster_made_with_trust_is_switched_to_passwords(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "postgres")
    pg.start()
    try:
        # as a cluster initialised before this change: trust, no password file
        hba = pg.pgdata / "pg_hba.conf"
        hba.write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
        pg.passfile.unlink()
        pg.stop()
        url = pg.start()
        assert "scram-sha-256" in hba.read_text() and "trust" not in hba.read_text()
        assert pg.passfile.stat().st_mode & 0o777 == 0o600
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
        with psycopg.connect(roles.as_role(url)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (roles.SERVING,)
        bare = psycopg.conninfo.make_conninfo(url, passfile=str(tmp_path / "none"))
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(bare, connect_timeout=5).close()
    finally:
        pg.stop()
