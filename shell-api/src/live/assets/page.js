// The live drop page: renders the drop from the page's initial JSON, then from `event: drop` of the drop's event
// stream (EventSource reconnects by itself and gets the current state at once). Units per second and the time to
// sell out come from how fast `available` fell over the last RATE_WINDOW_MS. A queue drop also shows its waiting room;
// opened with `?access_token=` (as the event streams take it), the page shows a queue drop's member their place,
// the people ahead and the wait, and a draw's entrant their entry, polled every MINE_POLL_MS.
(() => {
  "use strict";
  const RATE_WINDOW_MS = 10000;
  const MINE_POLL_MS = 1000;
  const token = new URLSearchParams(location.search).get("access_token");
  const $ = (id) => document.getElementById(id);
  const id = location.pathname.split("/").filter(Boolean).pop();
  let drop = JSON.parse($("initial").textContent);
  let events = 0;
  const samples = []; // [ms, available]

  const fmt = (n) => Number(n).toLocaleString("en-US");
  const two = (n) => String(n).padStart(2, "0");
  const span = (ms) => {
    const s = Math.max(0, Math.ceil(ms / 1000));
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    return (d > 0 ? d + "d " : "") + two(h) + ":" + two(m) + ":" + two(s % 60);
  };
  const statusText = { scheduled: "Scheduled", open: "Open", sold_out: "Sold out", closed: "Closed" };

  function sample(now) {
    samples.push([now, drop.available]);
    while (samples.length > 2 && now - samples[0][0] > RATE_WINDOW_MS) samples.shift();
  }

  function rate() {
    if (samples.length < 2) return 0;
    const [t0, a0] = samples[0], [t1, a1] = samples[samples.length - 1];
    return t1 > t0 ? Math.max(0, (a0 - a1) * 1000 / (t1 - t0)) : 0;
  }

  function render() {
    $("available").textContent = fmt(drop.available);
    $("held").textContent = fmt(drop.held);
    $("sold").textContent = fmt(drop.sold);
    $("stock").textContent = fmt(drop.stock);
    $("bar-sold").style.width = (100 * drop.sold / drop.stock) + "%";
    $("bar-held").style.width = (100 * drop.held / drop.stock) + "%";
    const pill = $("status");
    pill.textContent = statusText[drop.status] || drop.status;
    pill.className = "pill " + drop.status;
    $("price").textContent = fmt(drop.price) + " " + drop.currency;
    $("limit").textContent = "limit " + drop.per_member_limit + " per buyer";
    renderCampaign();
    const r = rate();
    $("rate").textContent = r > 0 ? r.toFixed(1) : "0";
    $("eta").textContent = drop.available === 0 ? "sold out" : r > 0 ? span(1000 * drop.available / r) : "–";
    if (drop.queue) {
      $("queue").style.display = "";
      $("q-waiting").textContent = fmt(drop.queue.waiting);
      $("q-admitted").textContent = fmt(drop.queue.admitted);
    }
    document.body.dataset.events = String(events);
    document.body.dataset.status = drop.status;
    tick();
  }

  // A campaign (a drop with a goal): its progress toward the goal and its outcome, as the drop body says it.
  const campaignText = { live: "Live", funded: "Funded", unfunded: "Not funded: refunded" };
  function renderCampaign() {
    if (!drop.goal_units) return;
    $("campaign").hidden = false;
    $("goal").textContent = fmt(drop.goal_units);
    const progress = Math.min(100, 100 * drop.sold / drop.goal_units);
    $("bar-goal").style.width = progress + "%";
    $("goal-percent").textContent = Math.floor(100 * drop.sold / drop.goal_units) + "%";
    const state = $("campaign-state");
    state.textContent = campaignText[drop.campaign] || drop.campaign;
    state.className = "pill " + drop.campaign;
    document.body.dataset.campaign = drop.campaign;
  }

  function tick() {
    const now = Date.now(), opens = Date.parse(drop.opens_at);
    const closes = drop.closes_at ? Date.parse(drop.closes_at) : null;
    if (now < opens) {
      $("countdown-label").textContent = "Opens in";
      $("countdown").textContent = span(opens - now);
    } else if (closes && now < closes && drop.status !== "closed") {
      $("countdown-label").textContent = "Closes in";
      $("countdown").textContent = span(closes - now);
    } else {
      $("countdown-label").textContent = drop.status === "closed" ? "Closed" : "Open since";
      $("countdown").textContent = new Date(opens).toLocaleTimeString("en-GB");
    }
  }

  const clock = (at) => new Date(at).toLocaleTimeString("en-GB");

  function queueText(p) {
    if (p.status === "waiting") {
      if (p.position == null) return "in the pre-queue: places are drawn at the opening";
      const wait = p.eta_seconds == null ? "wait unknown" : "about " + span(1000 * p.eta_seconds);
      return "#" + fmt(p.position) + " · " + fmt(p.ahead) + " ahead · " + wait;
    }
    if (p.status === "admitted") return "admitted: reserve before " + clock(p.pass_expires_at);
    return { sold_out: "sold out", closed: "closed", expired: "your pass expired: join again" }[p.status] || p.status;
  }

  function drawText(p) {
    return {
      entered: "entered: the draw is at " + clock(drop.draw_at),
      won: "won (rank " + fmt(p.rank) + "): pay your hold",
      waitlisted: "waitlisted (rank " + fmt(p.rank) + ")",
      lost: "not drawn",
    }[p.status] || p.status;
  }

  // The signed-in member's own place (queue) or entry (draw).
  function mine() {
    if (!token || (drop.mode !== "queue" && drop.mode !== "draw")) return;
    const path = "/api/v1/drops/" + id + (drop.mode === "queue" ? "/queue/me" : "/entries/me");
    fetch(path, { headers: { authorization: "Bearer " + token } })
      .then((r) => (r.status === 404 ? { status: "none" } : r.ok ? r.json() : null))
      .then((p) => {
        if (!p) return;
        $("mine").style.display = "";
        const none = drop.mode === "queue" ? "not in the queue" : "not entered";
        $("mine-text").textContent = p.status === "none" ? none : drop.mode === "queue" ? queueText(p) : drawText(p);
        document.body.dataset.mine = p.status;
      })
      .catch(() => {});
  }

  function link(state, text) {
    $("link").className = "link " + state;
    $("link-text").textContent = text;
  }

  fetch("/api/v1/products/" + drop.product_id)
    .then((r) => (r.ok ? r.json() : null))
    .then((p) => { if (p && p.name) { $("name").textContent = p.name; document.title = p.name + " · live drop"; } })
    .catch(() => {});

  sample(Date.now());
  render();
  setInterval(tick, 250);
  mine();
  setInterval(mine, MINE_POLL_MS);
  const source = new EventSource("/api/v1/drops/" + id + "/events");
  source.addEventListener("open", () => link("live", "live"));
  source.addEventListener("error", () => link("down", "reconnecting…"));
  source.addEventListener("drop", (e) => {
    drop = JSON.parse(e.data);
    events += 1;
    sample(Date.now());
    render();
  });
})();
