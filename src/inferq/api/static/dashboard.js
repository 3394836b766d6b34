// inferq dashboard: one EventSource per page keeps its live region current; actions are
// confirmed in a <dialog>, then POSTed with the page's CSRF token. No framework, no CDN.
"use strict";

(function () {
  const body = document.body;
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";
  const state = document.getElementById("live-state");
  const region = document.getElementById("live");
  const output = document.getElementById("output");
  let receivedAt = performance.now();

  function setState(name) {
    if (state) { state.dataset.state = name; state.textContent = name; }
    body.dataset.liveState = name;
  }

  // Ages (oldest pending, last heartbeat) advance between snapshots on the browser's clock.
  function tickAges() {
    const elapsed = (performance.now() - receivedAt) / 1000;
    for (const cell of document.querySelectorAll("[data-age]")) {
      if (cell.dataset.age === "") continue;
      const s = Math.floor(Number(cell.dataset.age) + elapsed);
      const suffix = cell.textContent.endsWith(" ago") ? " ago" : "";
      cell.textContent = formatDuration(s) + suffix;
    }
  }
  function formatDuration(s) {
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " m " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " m";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }
  setInterval(tickAges, 1000);

  function connect() {
    const url = body.dataset.live;
    if (!url) return;
    const source = new EventSource(url);
    source.onopen = () => {
      setState("live");
      // Every connection replays the live attempt's output from its start.
      if (output) output.textContent = "";
    };
    source.onerror = () => setState(source.readyState === EventSource.CLOSED ? "down" : "connecting");
    source.addEventListener("html", (e) => {
      const data = JSON.parse(e.data);
      region.innerHTML = data.html;
      receivedAt = performance.now();
      body.dataset.updates = String(Number(body.dataset.updates || 0) + 1);
      if (data.status) body.dataset.taskStatus = data.status;
    });
    source.addEventListener("output", (e) => {
      if (output) output.textContent += JSON.parse(e.data).text;
    });
    source.addEventListener("reset", () => {
      if (output) output.textContent = "";
    });
    source.addEventListener("bye", (e) => {
      const reason = JSON.parse(e.data).reason;
      source.close();
      if (reason === "revoked") { window.location = "/dashboard/login"; return; }
      if (reason === "done") { setState("ended"); return; }
      // A draining replica: the load balancer sends the next connection elsewhere.
      setState("connecting");
      setTimeout(connect, 1000);
    });
  }

  // Actions: confirm, then POST with the CSRF token; the live region shows the outcome.
  const dialog = document.getElementById("confirm");
  const flash = document.getElementById("flash");
  function show(message, bad) {
    flash.hidden = false;
    flash.textContent = message;
    flash.className = bad ? "bad" : "";
  }
  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    event.preventDefault();
    document.getElementById("confirm-text").textContent = button.dataset.confirm;
    dialog.returnValue = "";
    dialog.showModal();
    dialog.addEventListener("close", async function once() {
      dialog.removeEventListener("close", once);
      if (dialog.returnValue !== "ok") return;
      const response = await fetch(button.dataset.action, {
        method: "POST",
        headers: { "X-CSRF-Token": csrf },
        credentials: "same-origin",
      });
      const answer = await response.json().catch(() => ({}));
      if (response.ok) show("Done: " + (answer.status || "revoked"), false);
      else show((answer.error && answer.error.message) || "refused (" + response.status + ")", true);
    });
  });

  connect();
})();
