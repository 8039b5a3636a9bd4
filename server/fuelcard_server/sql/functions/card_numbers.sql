-- Card numbers in segments (分段存储): each segment sealed under its own key in its own
-- schema, owned by its own NOLOGIN role and reachable only through that role's SECURITY
-- DEFINER functions; the whole number, sealed under a fourth key, in a fourth schema.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

-- After fc.issue_card in the same statement (one transaction): stores the
-- new card's sealed segments and sealed number. p_sealed holds four values:
-- segments 1-3, then the whole number. A replayed issue stores nothing.
CREATE OR REPLACE FUNCTION fc.store_card_number(p_issued jsonb, p_pan_index bytea, p_root_key_id text,
                                     p_sealed bytea[]) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_card_id bigint;
BEGIN
    IF p_issued ? 'replayed' THEN
        RETURN p_issued;
    END IF;
    SELECT id INTO STRICT v_card_id FROM fc.cards WHERE pan_index = p_pan_index;
    PERFORM fc_pan_seg1.put(v_card_id, p_root_key_id, p_sealed[1]);
    PERFORM fc_pan_seg2.put(v_card_id, p_root_key_id, p_sealed[2]);
    PERFORM fc_pan_seg3.put(v_card_id, p_root_key_id, p_sealed[3]);
    PERFORM fc_pan_vault.put(v_card_id, p_root_key_id, p_sealed[4]);
    RETURN p_issued;
END $$;

-- A card's stored number parts for RevealCardNumber: its blind index, the
-- root key id, and the four sealed values (NULLs for a card made without
-- them, e.g. seeded by the load generator). NULL for an unknown card.
CREATE OR REPLACE FUNCTION fc.card_number_parts(p_card_uid uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'pan_index', encode(c.pan_index, 'hex'),
        'root_key_id', (fc_pan_vault.get(c.id)).root_key_id,
        'sealed', jsonb_build_array(encode((fc_pan_seg1.get(c.id)).sealed, 'hex'),
                                    encode((fc_pan_seg2.get(c.id)).sealed, 'hex'),
                                    encode((fc_pan_seg3.get(c.id)).sealed, 'hex'),
                                    encode((fc_pan_vault.get(c.id)).sealed, 'hex')))
      FROM fc.cards c WHERE c.uid = p_card_uid
$$;

-- `fuelcard keys rotate-card-index` (key_custody.py), one card at a time inside a batch: the
-- card's blind index under the new card-index key, and its four parts re-sealed, since each is
-- bound to the index (p_sealed as in fc.store_card_number). The caller holds the rotation row's
-- lock, so one run moves a card once.
CREATE OR REPLACE FUNCTION fc.reindex_card(p_card_id bigint, p_pan_index bytea, p_root_key_id text,
                                           p_sealed bytea[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE fc.cards SET pan_index = p_pan_index WHERE id = p_card_id;
    PERFORM fc_pan_seg1.replace(p_card_id, p_root_key_id, p_sealed[1]);
    PERFORM fc_pan_seg2.replace(p_card_id, p_root_key_id, p_sealed[2]);
    PERFORM fc_pan_seg3.replace(p_card_id, p_root_key_id, p_sealed[3]);
    PERFORM fc_pan_vault.replace(p_card_id, p_root_key_id, p_sealed[4]);
END $$;

-- The segment schemas' own functions (owned by the schema's role): put stores a sealed value
-- once, get reads it back, replace re-seals it (card-index rotation only). The server's role
-- may only EXECUTE them.

CREATE OR REPLACE FUNCTION fc_pan_seg1.put(p_card_id bigint, p_root_key_id text, p_sealed bytea)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
'INSERT INTO fc_pan_seg1.sealed (card_id, root_key_id, sealed) VALUES ($1, $2, $3)
             ON CONFLICT (card_id) DO NOTHING';
CREATE OR REPLACE FUNCTION fc_pan_seg1.get(p_card_id bigint, OUT root_key_id text, OUT sealed bytea)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS
'SELECT root_key_id, sealed FROM fc_pan_seg1.sealed WHERE card_id = $1';
ALTER FUNCTION fc_pan_seg1.put(bigint, text, bytea) OWNER TO fc_pan_seg1;
ALTER FUNCTION fc_pan_seg1.get(bigint) OWNER TO fc_pan_seg1;
REVOKE ALL ON FUNCTION fc_pan_seg1.put(bigint, text, bytea), fc_pan_seg1.get(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fc_pan_seg1.put(bigint, text, bytea), fc_pan_seg1.get(bigint) TO CURRENT_USER;
CREATE OR REPLACE FUNCTION fc_pan_seg1.replace(p_card_id bigint, p_root_key_id text, p_sealed bytea)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
'UPDATE fc_pan_seg1.sealed SET root_key_id = $2, sealed = $3 WHERE card_id = $1';
ALTER FUNCTION fc_pan_seg1.replace(bigint, text, bytea) OWNER TO fc_pan_seg1;
REVOKE ALL ON FUNCTION fc_pan_seg1.replace(bigint, text, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fc_pan_seg1.replace(bigint, text, bytea) TO CURRENT_USER;

CREATE OR REPLACE FUNCTION fc_pan_seg2.put(p_card_id bigint, p_root_key_id text, p_sealed bytea)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
'INSERT INTO fc_pan_seg2.sealed (card_id, root_key_id, sealed) VALUES ($1, $2, $3)
             ON CONFLICT (card_id) DO NOTHING';
CREATE OR REPLACE FUNCTION fc_pan_seg2.get(p_card_id bigint, OUT root_key_id text, OUT sealed bytea)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS
'SELECT root_key_id, sealed FROM fc_pan_seg2.sealed WHERE card_id = $1';
ALTER FUNCTION fc_pan_seg2.put(bigint, text, bytea) OWNER TO fc_pan_seg2;
ALTER FUNCTION fc_pan_seg2.get(bigint) OWNER TO fc_pan_seg2;
REVOKE ALL ON FUNCTION fc_pan_seg2.put(bigint, text, bytea), fc_pan_seg2.get(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fc_pan_seg2.put(bigint, text, bytea), fc_pan_seg2.get(bigint) TO CURRENT_USER;
CREATE OR REPLACE FUNCTION fc_pan_seg2.replace(p_card_id bigint, p_root_key_id text, p_sealed bytea)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
'UPDATE fc_pan_seg2.sealed SET root_key_id = $2, sealed = $3 WHERE card_id = $1';
ALTER FUNCTION fc_pan_seg2.replace(bigint, text, bytea) OWNER TO fc_pan_seg2;
REVOKE ALL ON FUNCTION fc_pan_seg2.replace(bigint, text, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fc_pan_seg2.replace(bigint, text, bytea) TO CURRENT_USER;

CREATE OR REPLACE FUNCTION fc_pan_seg3.put(p_card_id bigint, p_root_key_id text, p_sealed bytea)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
'INSERT INTO fc_pan_seg3.sealed (card_id, root_key_id, sealed) VALUES ($1, $2, $3)
             ON CONFLICT (card_id) DO NOTHING';
CREATE OR REPLACE FUNCTION fc_pan_seg3.get(p_card_id bigint, OUT root_key_id text, OUT sealed bytea)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS
'SELECT root_key_id, sealed FROM fc_pan_seg3.sealed WHERE card_id = $1';
ALTER FUNCTION fc_pan_seg3.put(bigint, text, bytea) OWNER TO fc_pan_seg3;
ALTER FUNCTION fc_pan_seg3.get(bigint) OWNER TO fc_pan_seg3;
REVOKE ALL ON FUNCTION fc_pan_seg3.put(bigint, text, bytea), fc_pan_seg3.get(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fc_pan_seg3.put(bigint, text, bytea), fc_pan_seg3.get(bigint) TO CURRENT_USER;
CREATE OR REPLACE FUNCTION fc_pan_seg3.replace(p_card_id bigint, p_root_key_id text, p_sealed bytea)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
'UPDATE fc_pan_seg3.sealed SET root_key_id = $2, sealed = $3 WHERE card_id = $1';
ALTER FUNCTION fc_pan_seg3.replace(bigint, text, bytea) OWNER TO fc_pan_seg3;
REVOKE ALL ON FUNCTION fc_pan_seg3.replace(bigint, text, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fc_pan_seg3.replace(bigint, text, bytea) TO CURRENT_USER;

CREATE OR REPLACE FUNCTION fc_pan_vault.put(p_card_id bigint, p_root_key_id text, p_sealed bytea)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
'INSERT INTO fc_pan_vault.sealed (card_id, root_key_id, sealed) VALUES ($1, $2, $3)
             ON CONFLICT (card_id) DO NOTHING';
CREATE OR REPLACE FUNCTION fc_pan_vault.get(p_card_id bigint, OUT root_key_id text, OUT sealed bytea)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS
'SELECT root_key_id, sealed FROM fc_pan_vault.sealed WHERE card_id = $1';
ALTER FUNCTION fc_pan_vault.put(bigint, text, bytea) OWNER TO fc_pan_vault;
ALTER FUNCTION fc_pan_vault.get(bigint) OWNER TO fc_pan_vault;
REVOKE ALL ON FUNCTION fc_pan_vault.put(bigint, text, bytea), fc_pan_vault.get(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fc_pan_vault.put(bigint, text, bytea), fc_pan_vault.get(bigint) TO CURRENT_USER;
CREATE OR REPLACE FUNCTION fc_pan_vault.replace(p_card_id bigint, p_root_key_id text, p_sealed bytea)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
'UPDATE fc_pan_vault.sealed SET root_key_id = $2, sealed = $3 WHERE card_id = $1';
ALTER FUNCTION fc_pan_vault.replace(bigint, text, bytea) OWNER TO fc_pan_vault;
REVOKE ALL ON FUNCTION fc_pan_vault.replace(bigint, text, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fc_pan_vault.replace(bigint, text, bytea) TO CURRENT_USER;
