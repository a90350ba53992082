-- A task's news rewrites its `ticket_tasks` row (its state and seq, which no index holds).
-- With room on the row's page that is a HOT update: no index entry. Rows are inserted
-- together when tasks are added, so their pages were full, and about a quarter of the news
-- updates (measured in a drain) went to another page with an entry in both indexes. With a
-- fifth of each page kept free, every one of them was HOT. Pages written from now on keep it.
alter table ticket_tasks set (fillfactor = 80);
