-- Session affinity for rnnserve (loaded by haproxy.cfg): the sample fetch `lua.rnnserve_replica` names the
-- server a call's `x-rnnserve-affinity` key belongs to, by rendezvous hashing (highest random weight, Thaler
-- and Ravishankar 1998) over the servers that are up: every server scores xxh64(key | server address) and the
-- highest score wins.
--
-- Why not HAProxy's own `hash-type consistent`: in HAProxy 2.6 the ring positions of a server follow its slot
-- number, and a `server-template` slot gets whichever address the DNS answer lists first when it is filled, so
-- two proxies (or one proxy before and after a restart) can build different rings from the same pods. Scores
-- that depend only on the key and the pod's address make every proxy agree, whatever their history. And as
-- with a ring, a server that leaves loses only its own keys, and one that joins takes about 1/N of them.
local HEADER = "x-rnnserve-affinity"
local BACKEND = "rnnserve"

core.register_fetches("rnnserve_replica", function(txn)
    local key = txn.sf:req_fhdr(HEADER)
    if key == nil or key == "" then
        return nil -- not a session's call: the backend's own balancing applies
    end
    local best, best_score, best_addr = nil, nil, nil
    for name, server in pairs(core.backends[BACKEND].servers) do
        local addr = server:get_addr()
        -- Only servers that are up: an empty slot ("<unknown>": no pod resolved to it), a DOWN one (failed
        -- health check: crashed or draining) and a MAINT one (gone from the DNS answer) take nothing.
        if addr ~= "<unknown>" and server:get_stats().status == "UP" then
            local score = txn.c:xxh64(key .. "|" .. addr)
            -- Ties (a 64-bit collision) go to the lower address, which every proxy sees alike.
            if best_score == nil or score > best_score or (score == best_score and addr < best_addr) then
                best, best_score, best_addr = name, score, addr
            end
        end
    end
    return best
end)
