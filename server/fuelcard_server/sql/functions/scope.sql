-- Where and when a card may be used: stations, products, geo-fences (circles, polygons)
-- and local hours.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

-- Pure helpers: geo-fences, hours, limits.
------------------------------------------------------------------------------

-- Great-circle distance in metres (haversine; the earth as a sphere is
-- accurate to ~0.5 %, far inside any fence a fleet manager draws).
CREATE OR REPLACE FUNCTION fc.distance_m(lat1 double precision, lon1 double precision,
                              lat2 double precision, lon2 double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT 2 * 6371008.8 * asin(sqrt(
        power(sin(radians(lat2 - lat1) / 2), 2)
        + cos(radians(lat1)) * cos(radians(lat2)) * power(sin(radians(lon2 - lon1) / 2), 2)))
$$;

-- Ray casting on the plane of latitude/longitude: fine for city- and
-- province-sized fences that do not cross the antimeridian.
CREATE OR REPLACE FUNCTION fc.in_polygon(p_vertices jsonb, lat double precision, lon double precision)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    n      integer := jsonb_array_length(p_vertices);
    inside boolean := false;
    i      integer;
    j      integer := n - 1;
    yi double precision; xi double precision; yj double precision; xj double precision;
BEGIN
    FOR i IN 0 .. n - 1 LOOP
        yi := (p_vertices -> i ->> 0)::double precision;
        xi := (p_vertices -> i ->> 1)::double precision;
        yj := (p_vertices -> j ->> 0)::double precision;
        xj := (p_vertices -> j ->> 1)::double precision;
        IF ((yi > lat) <> (yj > lat)) AND (lon < (xj - xi) * (lat - yi) / (yj - yi) + xi) THEN
            inside := NOT inside;
        END IF;
        j := i;
    END LOOP;
    RETURN inside;
END $$;

-- Fences are a jsonb array of {"circle": [lat, lon, radius_m]} or
-- {"polygon": [[lat, lon], ...]}; a station inside any one is inside.
CREATE OR REPLACE FUNCTION fc.in_fences(p_fences jsonb, lat double precision, lon double precision)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    f jsonb;
BEGIN
    FOR f IN SELECT * FROM jsonb_array_elements(p_fences) LOOP
        IF f ? 'circle' THEN
            IF fc.distance_m(lat, lon, (f -> 'circle' ->> 0)::double precision,
                             (f -> 'circle' ->> 1)::double precision)
               <= (f -> 'circle' ->> 2)::double precision THEN
                RETURN true;
            END IF;
        ELSIF fc.in_polygon(f -> 'polygon', lat, lon) THEN
            RETURN true;
        END IF;
    END LOOP;
    RETURN false;
END $$;

-- Hours are pairs {start, end} of minutes after local midnight; end < start
-- wraps past midnight.
CREATE OR REPLACE FUNCTION fc.in_hours(p_hours integer[], p_minute integer) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM generate_subscripts(p_hours, 1) AS i
         WHERE i % 2 = 1
           AND CASE WHEN p_hours[i] <= p_hours[i + 1]
                    THEN p_minute >= p_hours[i] AND p_minute < p_hours[i + 1]
                    ELSE p_minute >= p_hours[i] OR p_minute < p_hours[i + 1] END)
$$;

-- Why a card may not buy here and now, or NULL if it may.
CREATE OR REPLACE FUNCTION fc.scope_refusal(c fc.cards, p_station_id text, p_product smallint,
                                 p_local timestamp)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_lat double precision;
    v_lon double precision;
BEGIN
    IF c.scope_stations IS NOT NULL AND NOT (p_station_id = ANY (c.scope_stations)) THEN
        RETURN 'STATION_NOT_ALLOWED';
    END IF;
    IF c.scope_products IS NOT NULL AND NOT (p_product = ANY (c.scope_products)) THEN
        RETURN 'PRODUCT_NOT_ALLOWED';
    END IF;
    IF c.scope_fences IS NOT NULL THEN
        SELECT latitude, longitude INTO v_lat, v_lon FROM fc.stations WHERE station_id = p_station_id;
        -- A station we cannot place cannot be shown to be inside the fence.
        IF NOT FOUND OR NOT fc.in_fences(c.scope_fences, v_lat, v_lon) THEN
            RETURN 'OUTSIDE_GEOFENCE';
        END IF;
    END IF;
    IF c.scope_hours IS NOT NULL
       AND NOT fc.in_hours(c.scope_hours,
                           (extract(hour FROM p_local) * 60 + extract(minute FROM p_local))::integer) THEN
        RETURN 'OUTSIDE_HOURS';
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION fc.set_scope(
    p_caller text, p_request_id text, p_request_hash bytea, p_actor_uid uuid, p_card_uid uuid,
    p_stations text[], p_products smallint[], p_fences jsonb, p_hours integer[],
    p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_target   record;
    v_actor    bigint;
    v_scope    jsonb := jsonb_build_object('station_ids', p_stations, 'products', p_products,
                                          'fences', p_fences, 'hours', p_hours);
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    v_target := fc.resolve_target(p_card_uid, NULL);
    v_actor := fc.require_controller(p_actor_uid, v_target.o_account);
    PERFORM fc.lock_chain((v_target.o_account).id);
    UPDATE fc.cards SET scope_stations = p_stations, scope_products = p_products,
                        scope_fences = p_fences, scope_hours = p_hours
     WHERE id = (v_target.o_card).id;
    INSERT INTO fc.control_changes (actor_account_id, kind, card_id, account_id, details, created_at)
    VALUES (v_actor, 'scope', (v_target.o_card).id, (v_target.o_account).id, v_scope, p_now);
    RETURN fc.remember(p_caller, p_request_id, 'set_scope', p_request_hash,
                       jsonb_build_object('scope', v_scope), p_now);
END $$;
